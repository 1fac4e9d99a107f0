#!/usr/bin/env python3
# SPDX-License-Identifier: MIT OR Apache-2.0
"""Cold start from zero workers (pool.min = 0, docs/guide/scaling.md "Scale to zero";
results in bench/results/coldstart.md).

    bench/coldstart.py [--droved PATH] [--worker PATH] [--rounds N]

For each worker (the Rust example worker; examples/wsgi_worker.py in exec
and in template mode) runs droved with min = 0 on 127.0.0.1, waits until it
has no worker, then times one request from connect() to the last byte of
the response: the pool wakes on the connection, forks a worker, the worker
gets ready and answers. Repeats N times (droved goes back to zero after
each, scale.cooldown = 300ms) and prints min / median / max in ms.

Not a test: nothing is asserted. Needs nothing but python3 and a built
droved and example worker (cargo build --release --examples).
"""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port):
    t = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
        c.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        data = b""
        while True:
            chunk = c.recv(65536)
            if not chunk:
                break
            data += chunk
    took = time.monotonic() - t
    if not data.startswith(b"HTTP/1.") or b" 200 " not in data.split(b"\r\n", 1)[0]:
        raise RuntimeError(f"bad answer: {data[:80]!r}")
    return took


def wait_log(path, needle, count, timeout=30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with open(path, encoding="utf-8", errors="replace") as f:
            if f.read().count(needle) >= count:
                return
        time.sleep(0.01)
    raise RuntimeError(f"timed out waiting for {count}x {needle!r} in {path}")


def measure(droved, name, command, mode, rounds):
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        conf = os.path.join(tmp, "drove.toml")
        with open(conf, "w") as f:
            f.write(
                f"""[listen]
addresses = ["127.0.0.1:{port}"]
[worker]
command = {command!r}
mode = "{mode}"
ready = "notify"
allow_root = true
[pool]
min = 0
max = 4
[scale]
cooldown = "300ms"
""".replace("'", '"')
            )
        log = os.path.join(tmp, "droved.log")
        env = dict(os.environ, DROVE_LOG="info")
        env.pop("NOTIFY_SOCKET", None)
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [droved, "-c", conf, "--bus", "none"],
                cwd=ROOT, env=env, stdout=out, stderr=out,
            )
        zero = "no workers; waiting for a connection"
        times = []
        try:
            wait_log(log, zero, 1)
            if mode == "template":
                wait_log(log, "ready after", 1)  # the template loaded the app
            for i in range(rounds):
                times.append(request(port))
                # Back at zero: the worker was retired after the cooldown.
                wait_log(log, zero, i + 2)
                time.sleep(0.1)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    ms = sorted(t * 1000 for t in times)
    print(
        f"{name:32} min {ms[0]:7.1f} ms  median {statistics.median(ms):7.1f} ms  max {ms[-1]:7.1f} ms  ({rounds} rounds)",
        flush=True,
    )
    return ms


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--droved", default=os.path.join(TARGET, "release", "droved"))
    p.add_argument("--worker", default=os.path.join(TARGET, "release", "examples", "worker"))
    p.add_argument("--rounds", type=int, default=10)
    a = p.parse_args()
    wsgi = ["python3", "examples/wsgi_worker.py", "examples/wsgi_app.py:application"]
    print(f"droved {a.droved}; first connection to response, from zero workers")
    measure(a.droved, "Rust example worker (exec)", [a.worker], "exec", a.rounds)
    measure(a.droved, "wsgi_worker.py (exec)", wsgi, "exec", a.rounds)
    measure(a.droved, "wsgi_worker.py (template)", wsgi, "template", a.rounds)


if __name__ == "__main__":
    sys.exit(main())
