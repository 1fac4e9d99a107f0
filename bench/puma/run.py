#!/usr/bin/env python3
# SPDX-License-Identifier: MIT OR Apache-2.0
"""bench/puma: drove-puma (template mode, 16 workers) against Puma's own
cluster mode with preload (`puma -w 16 --preload`), the same app
(bench/puma/app.ru), the same threads (-t 2:2).

    python3 bench/puma/run.py [--droved target/release/droved] [--workers 16]

Prints, per contender and run: start to all workers ready, then the PSS of
the whole pool (every process of it, summed from /proc/PID/smaps_rollup)
when ready and after a load of 4 concurrent clients for 10 s; droved's
own PSS apart. 127.0.0.1 only; every phase bounded.
"""
import argparse, os, re, signal, socket, subprocess, sys, tempfile, threading, time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
APP = os.path.join(HERE, "app.ru")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def tree(pid):
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            kids = open(f"/proc/{p}/task/{p}/children").read().split()
        except OSError:
            kids = []
        todo.extend(int(k) for k in kids)
    return out


def pss_kb(pid):
    try:
        for line in open(f"/proc/{pid}/smaps_rollup"):
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def load(port, seconds, clients=4):
    stop = time.monotonic() + seconds
    counts = [0] * clients

    def client(i):
        while time.monotonic() < stop:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/sleep?ms=5", timeout=5).read()
                counts[i] += 1
            except OSError:
                pass

    ts = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(counts)


def wait_for(pred, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.01)
    raise SystemExit("timed out")


def run_drove(droved, n, tmp):
    port = free_port()
    conf = os.path.join(tmp, "drove.toml")
    with open(conf, "w") as f:
        f.write(f"""
[listen]
addresses = ["127.0.0.1:{port}"]
[worker]
mode = "template"
command = ["ruby", "{REPO}/ruby/bin/drove-puma", "-e", "production", "-t", "2:2", "{APP}"]
ready = "notify"
ready_timeout = "60s"
allow_root = true
[pool]
min = {n}
max = {n}
""")
    log = open(os.path.join(tmp, "drove.log"), "w+")
    t0 = time.monotonic()
    p = subprocess.Popen([droved, "-c", conf], stdout=log, stderr=subprocess.STDOUT)
    wait_for(lambda: "pool ready" in open(log.name).read(), 120)
    ready = time.monotonic() - t0
    text = open(log.name).read()
    tpl = re.search(r"template \d+ ready after (\d+) ms", text)
    stamps = {}
    for line in text.splitlines():
        for key in ("event=\"template-ready\"", "pool ready"):
            if key in line and key not in stamps:
                stamps[key] = line.split()[0]
    from datetime import datetime
    t = [datetime.fromisoformat(stamps[k].rstrip("Z")) for k in ("event=\"template-ready\"", "pool ready")]
    forks = (t[1] - t[0]).total_seconds() * 1000
    return p, port, ready, f"(template {tpl.group(1)} ms, then {forks:.0f} ms to the pool ready)"


def run_puma(n, tmp):
    port = free_port()
    log = open(os.path.join(tmp, "puma.log"), "w+")
    t0 = time.monotonic()
    p = subprocess.Popen(["puma", "-e", "production", "-w", str(n), "--preload", "-t", "2:2",
                          "-b", f"tcp://127.0.0.1:{port}", "--no-config", APP],
                         stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
    wait_for(lambda: len(re.findall(r"Worker \d+ \(PID: \d+\) booted", open(log.name).read())) >= n, 120)
    return p, port, time.monotonic() - t0, ""


def measure(name, start, n, tmp, droved=None):
    p, port, ready, note = start()
    pool_root = p.pid
    procs = tree(pool_root)
    # drove: droved itself is not the pool; its children are.
    own = [pool_root] if droved else []
    pool = [q for q in procs if q not in own]
    pss0 = sum(pss_kb(q) for q in pool)
    reqs = load(port, 10)
    procs = tree(pool_root)
    pool = [q for q in procs if q not in own]
    pss1 = sum(pss_kb(q) for q in pool)
    extra = f", droved {pss_kb(pool_root) / 1024:.1f} MB" if droved else ""
    print(f"{name:28} ready in {ready * 1000:6.0f} ms {note:30} processes {len(pool):2}  "
          f"PSS {pss0 / 1024:6.1f} MB ready, {pss1 / 1024:6.1f} MB after {reqs} requests{extra}",
          flush=True)
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=60)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--droved", default=os.path.join(REPO, "target/release/droved"))
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    for _ in range(a.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            measure(f"drove-puma, template, {a.workers}", lambda: run_drove(a.droved, a.workers, tmp),
                    a.workers, tmp, droved=a.droved)
        with tempfile.TemporaryDirectory() as tmp:
            measure(f"puma -w {a.workers} --preload", lambda: run_puma(a.workers, tmp), a.workers, tmp)


if __name__ == "__main__":
    main()
