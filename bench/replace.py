# Run: python3 bench/replace.py --droved target/release/droved [--kills 100] [--app heavy]
# SPDX-License-Identifier: MIT OR Apache-2.0
"""Worker replacement time, exec mode against template mode.

For each mode: a static pool of 16 examples/wsgi_worker.py workers serving
bench/app.py (ready = "notify"), then `--kills` times: SIGKILL one ready
worker and time from the kill to the replacement's READY=1 as droved logs
it (its log line's timestamp; same clock as ours). Prints median and p99
per mode. 127.0.0.1 only; each pool is stopped at the end.

--app heavy: bench/heavy_app.py (~100 MB of objects at import) under
`python3 -m drove.gunicorn` instead (the --python must have gunicorn);
--app gunicorn-light: bench/app.py under it (what gunicorn's worker costs
without the heap).
"""

import argparse
import datetime
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
READY = re.compile(r'^(\S+)Z .*worker_pid=(\d+).*event="ready"')


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def readies(path):
    """(timestamp, pid) of every worker READY=1 in droved's log."""
    out = []
    with open(path) as f:
        for line in f:
            m = READY.match(line)
            if m and "worker " in line:
                ts = datetime.datetime.fromisoformat(m.group(1)).replace(
                    tzinfo=datetime.timezone.utc
                )
                out.append((ts.timestamp(), int(m.group(2))))
    return out


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_readies(path, n, timeout=300):
    end = time.time() + timeout
    while time.time() < end:
        r = readies(path)
        if len(r) >= n:
            return r
        time.sleep(0.002)
    sys.exit(f"timed out waiting for {n} READY=1 in {path}")


def run(mode, args, workdir):
    port = free_port()
    conf = os.path.join(workdir, f"{mode}.toml")
    log = os.path.join(workdir, f"{mode}.log")
    if args.app in ("heavy", "gunicorn-light"):
        # bench/heavy_app.py (~100 MB of objects) or bench/app.py under
        # gunicorn's sync worker through the adapter, in both modes.
        app = "heavy_app:application" if args.app == "heavy" else "app:application"
        command = [args.python, "-m", "drove.gunicorn", "--no-control-socket", "--chdir", BENCH, app]
        extra = (f'ready_timeout = "120s"\nenvironment = {{ PYTHONPATH = "{ROOT}/python", '
                 f'HEAVY_ITEMS = "200000" }}\n')
    else:
        command = [args.python, f"{ROOT}/examples/wsgi_worker.py", f"{BENCH}/app.py:application"]
        extra = ""
    with open(conf, "w") as f:
        f.write(
            f'[listen]\naddresses = ["127.0.0.1:{port}"]\n'
            f'[worker]\nmode = "{mode}"\nready = "notify"\n'
            f"command = {json.dumps(command)}\n{extra}"
            f"[pool]\nmin = {args.workers}\nmax = {args.workers}\n"
        )
    env = dict(os.environ, DROVE_LOG="info")
    with open(log, "w") as out:
        droved = subprocess.Popen(
            [args.droved, "-c", conf, "--instance", f"replace-{mode}"],
            stdout=out, stderr=out, env=env,
        )
    try:
        wait_readies(log, args.workers)
        time.sleep(1)
        times = []
        for _ in range(args.kills):
            r = readies(log)
            victim = next(pid for _, pid in reversed(r) if alive(pid))
            before = len(r)
            t0 = time.time()
            os.kill(victim, signal.SIGKILL)
            ts, _ = wait_readies(log, before + 1)[before]
            times.append((ts - t0) * 1000)
            time.sleep(args.pause)
        return times
    finally:
        droved.send_signal(signal.SIGTERM)
        droved.wait(timeout=60)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--droved", required=True)
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--kills", type=int, default=100)
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--pause", type=float, default=0.2, help="seconds between kills")
    p.add_argument("--app", choices=("light", "heavy", "gunicorn-light"), default="light",
                   help="heavy: bench/heavy_app.py under python3 -m drove.gunicorn; "
                   "gunicorn-light: bench/app.py under it")
    p.add_argument("--json", action="store_true", help="also print every time as one JSON line")
    args = p.parse_args()
    out = {"app": args.app, "workers": args.workers}
    with tempfile.TemporaryDirectory(prefix="drove-replace-") as workdir:
        for mode in ("exec", "template"):
            t = sorted(run(mode, args, workdir))
            p99 = t[min(len(t) - 1, int(len(t) * 0.99))]
            out[mode] = {"median_ms": statistics.median(t), "p99_ms": p99, "times_ms": t}
            print(
                f"{mode:8} kill -> replacement READY=1 over {len(t)} kills: "
                f"median {statistics.median(t):.1f} ms, p99 {p99:.1f} ms", flush=True
            )
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
