# Used by bench/run: python3 bench/bare_pool.py HOST:PORT BACKLOG N -- WORKER_COMMAND...
# SPDX-License-Identifier: MIT OR Apache-2.0
"""The no-supervisor baseline: bind one TCP socket, start N workers on it
with the socket-activation contract (fd 3, LISTEN_FDS=1, LISTEN_PID), then
do nothing until SIGTERM, which it passes on to the workers. No readiness,
no restarts, no scaling, no probes: what a pool costs without drove."""

import os
import signal
import socket
import subprocess
import sys


def main():
    addr, backlog, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    cmd = sys.argv[sys.argv.index("--") + 1 :]
    host, port = addr.rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, int(port)))
    sock.listen(backlog)
    fd = sock.fileno()
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "LISTEN_PID")}
    env.update(LISTEN_FDS="1", LISTEN_FDNAMES="bare")

    def at_fd3():
        if fd == 3:
            os.set_inheritable(3, True)
        else:
            os.dup2(fd, 3)  # the copy is inheritable

    # sh sets LISTEN_PID to its own pid, which exec keeps for the worker.
    wrap = ["/bin/sh", "-c", 'LISTEN_PID=$$; export LISTEN_PID; exec "$@"', "sh"]
    procs = [subprocess.Popen(wrap + cmd, env=env, preexec_fn=at_fd3, close_fds=False) for _ in range(n)]
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    while not stop:
        signal.pause()
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()


if __name__ == "__main__":
    main()
