# Run: python3 bench/reap.py --droved target/release/droved [--rate 1000] [--seconds 10]   (as root)
# SPDX-License-Identifier: MIT OR Apache-2.0
"""What reaping orphans costs droved as PID 1 of a container.

droved runs as init of its own PID namespace (`unshare --pid --fork
--mount-proc`, as a container runtime would start it) with a pool of
`--workers` workers (bench/orphans.c, built with cc) that each make orphans
at an even pace: a double fork whose grandchild is left behind and exits at
once, so it comes to droved (PID 1) to be reaped. Two phases: no orphans (droved idle with the
same pool), then `--rate` orphans a second in all. Each phase measures, over
`--seconds`: droved's CPU time (utime + stime from /proc/PID/stat), the
orphans the workers actually made, and the zombies under droved (sampled
every 20 ms: how long exits wait to be reaped). Prints a table. 127.0.0.1
only (port 0); each droved is stopped with SIGTERM at the end.
"""

import argparse
import glob
import os
import signal
import subprocess
import sys
import tempfile
import time


BENCH = os.path.dirname(os.path.abspath(__file__))
CLK_TCK = os.sysconf("SC_CLK_TCK")


def stat_fields(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def cpu_seconds(pid):
    fields = stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children(pid):
    out = []
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        with open(path) as f:
            out.extend(int(p) for p in f.read().split())
    return out


def zombies(pid):
    n = 0
    for c in children(pid):
        try:
            if stat_fields(c)[0] == "Z":
                n += 1
        except (FileNotFoundError, ProcessLookupError):
            pass
    return n


def made(counts):
    total = 0
    for path in glob.glob(counts + "/count.*"):
        if path.endswith(".tmp"):
            continue
        with open(path) as f:
            total += int(f.read() or 0)
    return total


def phase(args, rate, tmp):
    per_worker = rate / args.workers
    script = os.path.join(tmp, "orphans")
    if not os.path.exists(script):
        subprocess.run(["cc", "-O2", "-o", script, os.path.join(BENCH, "orphans.c")], check=True)
    counts = os.path.join(tmp, f"counts-{rate}")
    os.makedirs(counts)
    config = os.path.join(tmp, f"drove-{rate}.toml")
    with open(config, "w") as f:
        f.write(f'''
[listen]
addresses = ["127.0.0.1:0"]
[pool]
min = {args.workers}
max = {args.workers}
[worker]
command = ["sh", "-c", "exec {script} {per_worker} {counts}/count.$DROVE_WORKER"]
ready = "exec"
allow_root = true
''')
    log = open(os.path.join(tmp, f"droved-{rate}.log"), "w")
    env = dict(os.environ, DROVE_LOG="info")
    env.pop("NOTIFY_SOCKET", None)
    env.pop("INVOCATION_ID", None)
    unshare = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child",
         args.droved, "-c", config, "--bus", "none"],
        stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 10
        init = None
        while time.monotonic() < deadline:
            kids = children(unshare.pid)
            if kids and os.path.realpath(f"/proc/{kids[0]}/exe") == os.path.realpath(args.droved):
                init = kids[0]
                if len([c for c in children(init)]) >= args.workers:
                    break
            time.sleep(0.05)
        else:
            sys.exit(f"droved did not start its {args.workers} workers; see {log.name}")
        time.sleep(args.warmup)
        cpu0, made0, t0 = cpu_seconds(init), made(counts), time.monotonic()
        samples = []
        while time.monotonic() - t0 < args.seconds:
            samples.append(zombies(init))
            time.sleep(0.02)
        cpu1, made1, t1 = cpu_seconds(init), made(counts), time.monotonic()
        end_zombies = zombies(init)
        os.kill(init, signal.SIGTERM)
        code = unshare.wait(timeout=30)
    finally:
        if unshare.poll() is None:
            unshare.kill()
            unshare.wait()
    elapsed = t1 - t0
    orphans = made1 - made0
    cpu = cpu1 - cpu0
    return {
        "rate": rate,
        "orphans_per_s": orphans / elapsed,
        "cpu_ms_per_s": 1000 * cpu / elapsed,
        "cpu_us_per_orphan": (1e6 * cpu / orphans) if orphans else None,
        "zombies_max": max(samples),
        "zombies_mean": sum(samples) / len(samples),
        "zombies_end": end_zombies,
        "exit": code,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--droved", required=True)
    p.add_argument("--rate", type=float, default=1000, help="orphans a second, all workers together")
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--warmup", type=float, default=1)
    p.add_argument("--workers", type=int, default=4)
    args = p.parse_args()
    args.droved = os.path.abspath(args.droved)
    with tempfile.TemporaryDirectory(prefix="drove-reap-") as tmp:
        rows = [phase(args, 0, tmp), phase(args, args.rate, tmp)]
    print(f"droved as PID 1, {args.workers} workers, {args.seconds:g} s per phase "
          f"(CPU time at {CLK_TCK} ticks/s)")
    print("| target orphans/s | made orphans/s | droved CPU ms/s | droved CPU µs/orphan "
          "| zombies max | zombies mean | zombies at end | droved exit |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        per = "-" if r["cpu_us_per_orphan"] is None else f"{r['cpu_us_per_orphan']:.1f}"
        print(f"| {r['rate']:g} | {r['orphans_per_s']:.0f} | {r['cpu_ms_per_s']:.1f} | {per} "
              f"| {r['zombies_max']} | {r['zombies_mean']:.2f} | {r['zombies_end']} | {r['exit']} |")


if __name__ == "__main__":
    main()
