#!/usr/bin/env python3
# SPDX-License-Identifier: MIT OR Apache-2.0
"""drove.gunicorn in template mode: start -> 16 ready, and the pool's PSS
with and without gc.freeze() in the template, for a heavy app (~100 MB of
Python objects at import, bench/heavy_app.py).

    bench/gunicorn_template.py [--python target/compat-venv/bin/python3]
                               [--droved target/debug/droved] [--workers 16]

For each variant: droved with a static pool of --workers gunicorn sync
workers forked from one template; the time from droved's start to its pool
being ready (and from the template's hello to it); then --requests
requests to /work from 8 clients (each reads 2,000 of the app's objects;
the first in each worker runs a full collection), a pause, and the PSS of the
template plus its workers (/proc/PID/smaps_rollup). "no freeze" runs the
same template with serve_template(freeze=False).
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_FREEZE = (
    "import drove._protocol as p, runpy; o = p.serve_template; "
    "p.serve_template = lambda fd, log, freeze=True: o(fd, log, freeze=False); "
    "runpy.run_module('drove.gunicorn', run_name='__main__', alter_sys=True)"
)


def pss_kb(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def stamp(line):
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z", line)
    if not m:
        return None
    t = time.strptime(m.group(1)[:19], "%Y-%m-%dT%H:%M:%S")
    return time.mktime(t) - time.timezone + float("0." + m.group(1)[20:])


def run(args, freeze, port):
    prog = ["-m", "drove.gunicorn"] if freeze else ["-c", NO_FREEZE]
    command = [args.python, *prog, "--no-control-socket", "--chdir",
               os.path.join(ROOT, "bench"), "heavy_app:application"]
    with tempfile.TemporaryDirectory() as tmp:
        conf = os.path.join(tmp, "bench.toml")
        with open(conf, "w") as f:
            f.write(f"""
[listen]
addresses = ["127.0.0.1:{port}"]
[worker]
command = [{", ".join(f'"{a}"' for a in command)}]
mode = "template"
ready = "notify"
ready_timeout = "60s"
allow_root = true
environment = {{ PYTHONPATH = "{ROOT}/python", HEAVY_ITEMS = "{args.items}" }}
[pool]
min = {args.workers}
max = {args.workers}
""")
        log_path = os.path.join(tmp, "droved.log")
        t0 = time.time()
        with open(log_path, "w") as log:
            d = subprocess.Popen([args.droved, "-c", conf, "--instance", f"bench{port}"],
                                 stdout=log, stderr=log)
        try:
            deadline = time.time() + 120
            text = ""
            while "pool ready" not in text:
                if time.time() > deadline or d.poll() is not None:
                    sys.exit(f"droved did not get ready:\n{open(log_path).read()[-3000:]}")
                time.sleep(0.02)
                text = open(log_path).read()
            lines = text.splitlines()
            ready_at = stamp(next(l for l in lines if "pool ready" in l))
            hello_at = stamp(next(l for l in lines if "template-ready" in l))
            start_to_ready = ready_at - t0
            hello_to_ready = ready_at - hello_at

            done = [0]

            def client(n):
                for _ in range(n):
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/work").read()
                    done[0] += 1

            clients = [threading.Thread(target=client, args=(args.requests // 8,)) for _ in range(8)]
            for c in clients:
                c.start()
            for c in clients:
                c.join()
            time.sleep(2)
            pids = children(d.pid)
            pss = sum(pss_kb(p) for p in pids)
            return start_to_ready, hello_to_ready, pss, len(pids), done[0]
        finally:
            d.terminate()
            d.wait(30)


def main():
    a = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("--python", default=os.path.join(ROOT, "target/compat-venv/bin/python3"))
    a.add_argument("--droved", default=os.path.join(ROOT, "target/debug/droved"))
    a.add_argument("--workers", type=int, default=16)
    a.add_argument("--requests", type=int, default=4000)
    a.add_argument("--rounds", type=int, default=1)
    a.add_argument("--items", type=int, default=200000, help="heavy_app's objects (0: a light app)")
    args = a.parse_args()
    print(f"| variant | start to {args.workers} ready | template hello to {args.workers} ready "
          f"| PSS, template + {args.workers} workers, after {args.requests} requests |")
    print("|---|---|---|---|")
    for rnd in range(args.rounds):
        for freeze in (True, False):
            s, h, pss, n, done = run(args, freeze, 18500 + rnd * 2 + freeze)
            name = "gc.freeze() (default)" if freeze else "no gc.freeze()"
            print(f"| {name} | {s * 1000:.0f} ms | {h * 1000:.0f} ms | {pss / 1024:.0f} MB ({n} processes) |",
                  flush=True)


if __name__ == "__main__":
    main()
