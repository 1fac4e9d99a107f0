#!/usr/bin/env python3
# Run: bench/fleet [--quick] [--sizes 16,64,256,1024] [--repeats 3] [--report-only]
# SPDX-License-Identifier: MIT OR Apache-2.0
"""droved's own cost as the pool grows (issue 27, item 4).

For each pool size N: `droved -w N` (static) with the Rust example worker
on 127.0.0.1, `[metrics] listen` on 127.0.0.1 and its private socket.
Once all N are ready and droved has settled, measure droved itself:

- idle CPU over --idle seconds (/proc/PID/stat utime+stime), % of a core;
- the scale tick's cost: droved's debug line `drove::tick_time` (mean and
  slowest tick over 10 s, see src/supervisor/tick.rs), and idle CPU per
  tick (CPU time / ticks, which also counts what runs between ticks);
- RSS and PSS of droved (VmRSS, smaps_rollup);
- scrape of /metrics, a fresh connection each: "cold" = the render cache
  (src/metrics/cache.rs, a render reused for up to 1 s) expired, so a full
  render (the workers' PSS readings, cached 30 s, stay warm after the
  first scrape, which is reported alone as "first"); "cached" = back to
  back, served from the render cache;
- `drovectl --instance X list --json`, wall time (the client included)
  and droved's CPU per call.

Then --instances droveds of --per-instance workers each, on one host:
total idle CPU and RSS/PSS. Writes bench/results/fleet.{json,md,png}.
A benchmark, not a test: nothing is asserted; targets are reported.
"""

import argparse
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
INTERVAL = 0.1  # droved's default scale.interval

# Issue 27's targets at 1,024 workers.
TARGETS = {
    "idle_cpu_pct": 1.0,
    "tick_mean_ms": 2.0,
    "scrape_cold_ms": 20.0,
    "list_ms": 100.0,
    "rss_mb": 12.0,
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return int(rest[11]) + int(rest[12])


def memory(pid):
    """(RSS, PSS) of one process, bytes."""
    rss = pss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
    return rss, pss


def raise_limits():
    # A thousand workers: droved holds a few fds per worker (pidfds, pipes).
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Droved:
    def __init__(self, ctx, name, workers, workdir):
        self.ctx, self.name, self.workers = ctx, name, workers
        self.port, self.mport = free_port(), free_port()
        self.log_path = os.path.join(workdir, f"{name}.log")
        conf = os.path.join(workdir, f"{name}.toml")
        with open(conf, "w") as f:
            f.write(
                "# written by bench/fleet.py; everything not set here is droved's default\n"
                f'[listen]\naddresses = ["127.0.0.1:{self.port}"]\n'
                f'[worker]\ncommand = ["{ctx.worker}"]\nready = "notify"\n'
                f"[pool]\nmin = {workers}\nmax = {workers}\n"
                f'[metrics]\nlisten = "127.0.0.1:{self.mport}"\n'
            )
        env = dict(os.environ, DROVE_LOG="info,drove::tick_time=debug")
        env.pop("INVOCATION_ID", None)
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [ctx.droved, "-c", conf, "--instance", name, "--bus", "none"],
            stdout=self.log, stderr=subprocess.STDOUT, env=env,
            preexec_fn=raise_limits,
        )

    @property
    def pid(self):
        return self.proc.pid

    def status(self):
        r = subprocess.run(
            [self.ctx.drovectl, "--instance", self.name, "status", "--json"],
            capture_output=True, text=True, timeout=30,
        )
        return json.loads(r.stdout) if r.returncode == 0 else None

    def wait_ready(self, deadline):
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"droved {self.name} exited: see {self.log_path}")
            s = self.status()
            if s and s.get("ready") == self.workers and s.get("starting") == 0:
                return
            time.sleep(0.5)
        raise SystemExit(f"droved {self.name}: not all {self.workers} ready in time ({self.log_path})")

    def scrape(self):
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", self.mport), timeout=30) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            body = b""
            while chunk := s.recv(65536):
                body += chunk
        took = time.perf_counter() - t0
        if not body.startswith(b"HTTP/1.1 200"):
            raise SystemExit(f"scrape of {self.name} failed: {body[:200]!r}")
        return took, len(body)

    def list(self):
        t0 = time.perf_counter()
        r = subprocess.run(
            [self.ctx.drovectl, "--instance", self.name, "list", "--json"],
            capture_output=True, timeout=60,
        )
        took = time.perf_counter() - t0
        if r.returncode != 0:
            raise SystemExit(f"drovectl list {self.name}: {r.stderr.decode()}")
        n = len(json.loads(r.stdout))
        return took, n

    def tick_lines(self):
        """The `drove::tick_time` lines logged so far: (ticks, mean µs, slowest µs)."""
        out = []
        with open(self.log_path, errors="replace") as f:
            for line in f:
                if "scale ticks in the last" not in line:
                    continue
                m = {k: int(v) for k, v in re.findall(r"(ticks|mean_us|slowest_us)=(\d+)", line)}
                if len(m) == 3:
                    out.append((m["ticks"], m["mean_us"], m["slowest_us"]))
        return out

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def pct(values, q):
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def loadavg():
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def measure_pool(ctx, n, rep, workdir):
    """One droved of `n` workers: every number of one row."""
    d = Droved(ctx, f"fleet-{n}-{rep}", n, workdir)
    try:
        t0 = time.monotonic()
        d.wait_ready(t0 + 60 + n * 0.2)
        ready_s = time.monotonic() - t0
        time.sleep(ctx.settle)
        # Idle: nobody talks to droved.
        load = loadavg()
        lines_before = len(d.tick_lines())
        c0, w0 = cpu_ticks(d.pid), time.monotonic()
        time.sleep(ctx.idle)
        c1, w1 = cpu_ticks(d.pid), time.monotonic()
        cpu_s = (c1 - c0) / CLK_TCK
        idle_pct = 100 * cpu_s / (w1 - w0)
        cpu_per_tick_ms = 1000 * cpu_s / ((w1 - w0) / INTERVAL)
        ticks = [t for t in d.tick_lines()[lines_before:]]
        rss, pss = memory(d.pid)
        # Scrapes: the first (every cache cold), then cold renders spaced
        # past the render cache's second, then cached ones back to back.
        first, size = d.scrape()
        cold, cached = [], []
        c0 = cpu_ticks(d.pid)
        for _ in range(ctx.scrapes):
            time.sleep(1.1)
            cold.append(d.scrape()[0])
        cold_cpu = (cpu_ticks(d.pid) - c0) / CLK_TCK - ctx.scrapes * 1.1 * idle_pct / 100
        d.scrape()
        for _ in range(ctx.scrapes):
            cached.append(d.scrape()[0])
        # drovectl list --json: the first call reads every worker's PSS
        # (cached 10 s after), so it is reported alone.
        list_first, listed = d.list()
        lists = []
        c0, w0 = cpu_ticks(d.pid), time.monotonic()
        for _ in range(ctx.lists):
            lists.append(d.list()[0])
        list_cpu = (cpu_ticks(d.pid) - c0) / CLK_TCK - (time.monotonic() - w0) * idle_pct / 100
        rss_after, _ = memory(d.pid)
        row = {
            "workers": n, "repeat": rep, "ready_s": round(ready_s, 2),
            "loadavg": load,
            "idle_cpu_pct": round(idle_pct, 3),
            "idle_cpu_ms_per_tick": round(cpu_per_tick_ms, 4),
            "tick_mean_us": statistics.median([t[1] for t in ticks]) if ticks else None,
            "tick_slowest_us": max(t[2] for t in ticks) if ticks else None,
            "tick_windows": ticks,
            "rss_mb": round(rss / 2**20, 2), "pss_mb": round(pss / 2**20, 2),
            "rss_after_requests_mb": round(rss_after / 2**20, 2),
            "scrape_bytes": size,
            "scrape_first_ms": round(1000 * first, 2),
            "scrape_cold_ms": round(1000 * statistics.median(cold), 2),
            "scrape_cold_p95_ms": round(1000 * pct(cold, 0.95), 2),
            "scrape_cold_cpu_ms": round(1000 * max(cold_cpu, 0) / ctx.scrapes, 2),
            "scrape_cached_ms": round(1000 * statistics.median(cached), 2),
            "scrape_cached_p95_ms": round(1000 * pct(cached, 0.95), 2),
            "list_first_ms": round(1000 * list_first, 1),
            "list_ms": round(1000 * statistics.median(lists), 1),
            "list_cpu_ms": round(1000 * max(list_cpu, 0) / ctx.lists, 2),
            "listed": listed,
        }
        print(f"  N={n} rep={rep}: idle {row['idle_cpu_pct']}% tick {row['tick_mean_us']}us "
              f"rss {row['rss_mb']}MB scrape {row['scrape_cold_ms']}/{row['scrape_cached_ms']}ms "
              f"list {row['list_ms']}ms load {load[0]}", file=sys.stderr)
        return row
    finally:
        d.stop()


def measure_many(ctx, rep, workdir):
    """--instances droveds of --per-instance workers on one host."""
    ds = []
    try:
        for i in range(ctx.instances):
            ds.append(Droved(ctx, f"fleet-many{i}-{rep}", ctx.per_instance, workdir))
        deadline = time.monotonic() + 180
        for d in ds:
            d.wait_ready(deadline)
        time.sleep(ctx.settle)
        load = loadavg()
        c0, w0 = sum(cpu_ticks(d.pid) for d in ds), time.monotonic()
        time.sleep(ctx.idle)
        c1, w1 = sum(cpu_ticks(d.pid) for d in ds), time.monotonic()
        mem = [memory(d.pid) for d in ds]
        row = {
            "instances": ctx.instances, "per_instance": ctx.per_instance, "repeat": rep,
            "loadavg": load,
            "idle_cpu_pct": round(100 * (c1 - c0) / CLK_TCK / (w1 - w0), 3),
            "rss_mb": round(sum(m[0] for m in mem) / 2**20, 1),
            "pss_mb": round(sum(m[1] for m in mem) / 2**20, 1),
        }
        print(f"  {ctx.instances} instances rep={rep}: idle {row['idle_cpu_pct']}% "
              f"rss {row['rss_mb']}MB pss {row['pss_mb']}MB", file=sys.stderr)
        return row
    finally:
        for d in ds:
            if d.proc.poll() is None:
                d.proc.send_signal(signal.SIGTERM)
        for d in ds:
            d.stop()


MEDIAN_KEYS = [
    "idle_cpu_pct", "idle_cpu_ms_per_tick", "tick_mean_us", "tick_slowest_us",
    "rss_mb", "pss_mb", "rss_after_requests_mb", "scrape_first_ms", "scrape_cold_ms",
    "scrape_cold_p95_ms", "scrape_cold_cpu_ms", "scrape_cached_ms", "scrape_cached_p95_ms",
    "list_first_ms", "list_ms", "list_cpu_ms",
]


def medians(rows, keys):
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if r.get(k) is not None]
        out[k] = round(statistics.median(vals), 4) if vals else None
    return out


def report(data, out):
    sizes = sorted({r["workers"] for r in data["pools"]})
    med = {n: medians([r for r in data["pools"] if r["workers"] == n], MEDIAN_KEYS) for n in sizes}
    data["medians"] = {str(n): m for n, m in med.items()}
    many = data.get("many") or []
    if many:
        data["many_medians"] = medians(many, ["idle_cpu_pct", "rss_mb", "pss_mb"])
    loads = [r["loadavg"][0] for r in data["pools"] + many]
    lines = [
        "# droved's own cost as the pool grows (bench/fleet)",
        "",
        f"{data['date']}, droved {data['version']}, release build, the Rust example worker, "
        f"static pools, 127.0.0.1. Medians of {data['repeats']} runs; idle {data['idle']} s, "
        f"{data['scrapes']} scrapes, {data['lists']} lists per run. "
        f"Load average (1 min) while measuring: {min(loads):.1f}–{max(loads):.1f} on 2 cores "
        "(other work shared the machine).",
        "",
        "| workers | idle CPU (% of a core) | CPU per tick (ms) | tick mean / slowest (µs) | RSS / PSS (MB) | scrape first / cold / cold p95 / cached (ms) | droved CPU per cold scrape (ms) | list first / median (ms) | droved CPU per list (ms) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    f = lambda v, d=2: "–" if v is None else f"{v:.{d}f}"
    for n in sizes:
        m = med[n]
        lines.append(
            f"| {n} | {f(m['idle_cpu_pct'])} | {f(m['idle_cpu_ms_per_tick'], 3)} | "
            f"{f(m['tick_mean_us'], 0)} / {f(m['tick_slowest_us'], 0)} | "
            f"{f(m['rss_mb'], 1)} / {f(m['pss_mb'], 1)} | "
            f"{f(m['scrape_first_ms'], 1)} / {f(m['scrape_cold_ms'], 1)} / {f(m['scrape_cold_p95_ms'], 1)} / {f(m['scrape_cached_ms'], 1)} | "
            f"{f(m['scrape_cold_cpu_ms'], 1)} | {f(m['list_first_ms'], 0)} / {f(m['list_ms'], 0)} | {f(m['list_cpu_ms'], 1)} |"
        )
    if many:
        mm = data["many_medians"]
        lines += [
            "",
            f"{many[0]['instances']} droveds of {many[0]['per_instance']} workers each on one host, idle: "
            f"{f(mm['idle_cpu_pct'])} % of a core in total, RSS {f(mm['rss_mb'], 1)} MB, "
            f"PSS {f(mm['pss_mb'], 1)} MB in total.",
        ]
    top = max(sizes)
    if top == 1024:
        m = med[top]
        lines += ["", "Issue 27's targets at 1,024 workers:", "",
                  "| what | target | measured | |", "|---|---|---|---|"]
        checks = [
            ("idle CPU (% of a core)", TARGETS["idle_cpu_pct"], m["idle_cpu_pct"]),
            ("a scale tick (ms, mean)", TARGETS["tick_mean_ms"],
             None if m["tick_mean_us"] is None else m["tick_mean_us"] / 1000),
            ("scrape (ms, cold render, median)", TARGETS["scrape_cold_ms"], m["scrape_cold_ms"]),
            ("`drovectl list --json` (ms, median)", TARGETS["list_ms"], m["list_ms"]),
            ("RSS (MB)", TARGETS["rss_mb"], m["rss_mb"]),
        ]
        for what, target, got in checks:
            verdict = "–" if got is None else ("met" if got <= target else "missed")
            lines.append(f"| {what} | ≤ {target:g} | {f(got, 3)} | {verdict} |")
    with open(out + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    with open(out + ".json", "w") as fh:
        json.dump(data, fh, indent=1)
    plot(data, sizes, med, out + ".png")
    print("\n".join(lines))


def plot(data, sizes, med, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("idle CPU (% of a core)", [("idle", "idle_cpu_pct")], TARGETS["idle_cpu_pct"]),
        # The slowest tick (in the table) is a moment droved waited for a
        # CPU on a busy machine; it would flatten the mean here.
        ("scale tick, mean (µs)", [("mean", "tick_mean_us")], TARGETS["tick_mean_ms"] * 1000),
        ("droved RSS (MB)", [("RSS", "rss_mb"), ("PSS", "pss_mb")], TARGETS["rss_mb"]),
        ("/metrics scrape (ms)", [("first", "scrape_first_ms"), ("cold", "scrape_cold_ms"),
                                  ("cached", "scrape_cached_ms")], TARGETS["scrape_cold_ms"]),
        ("drovectl list --json (ms)", [("first", "list_first_ms"), ("median", "list_ms")],
         TARGETS["list_ms"]),
        ("droved CPU per request (ms)", [("cold scrape", "scrape_cold_cpu_ms"),
                                         ("list", "list_cpu_ms")], None),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(14, 8))
    for ax, (title, series, target) in zip(axes.flat, panels):
        for label, key in series:
            xs = [n for n in sizes if med[n][key] is not None]
            ax.plot(xs, [med[n][key] for n in xs], marker="o", label=label)
            pts = [(r["workers"], r[key]) for r in data["pools"] if r.get(key) is not None]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=8, alpha=0.4)
        if target is not None:
            ax.axhline(target, color="red", linestyle="--", linewidth=1, label="target at 1,024")
        ax.set_xscale("log", base=2)
        ax.set_xlim(min(sizes) / 1.5, max(sizes) * 1.5)
        ax.set_xticks(sizes)
        ax.set_xticklabels([str(n) for n in sizes])
        ax.set_xlabel("workers")
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"droved's own cost vs pool size ({data['date']}, medians of {data['repeats']}, "
                 "dots: each run)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--droved", required=True)
    ap.add_argument("--drovectl", required=True)
    ap.add_argument("--worker", required=True, help="the Rust example worker")
    ap.add_argument("--sizes", default="16,64,256,1024")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--idle", type=float, default=20, help="seconds of idle CPU measurement")
    ap.add_argument("--settle", type=float, default=12,
                    help="seconds after all are ready, before measuring (covers one tick report)")
    ap.add_argument("--scrapes", type=int, default=20)
    ap.add_argument("--lists", type=int, default=10)
    ap.add_argument("--instances", type=int, default=50)
    ap.add_argument("--per-instance", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="1 repeat, 16 and 256 only, short phases")
    ap.add_argument("--out", default=os.path.join(RESULTS, "fleet"),
                    help="results path without extension")
    ap.add_argument("--report-only", action="store_true")
    ctx = ap.parse_args()
    if ctx.report_only:
        with open(ctx.out + ".json") as fh:
            report(json.load(fh), ctx.out)
        return
    if ctx.quick:
        ctx.sizes, ctx.repeats, ctx.idle, ctx.settle = "16,256", 1, 10, 11
        ctx.scrapes, ctx.lists, ctx.instances = 5, 3, 10
        if ctx.out == os.path.join(RESULTS, "fleet"):
            ctx.out = os.path.join(RESULTS, "quick.raw", "fleet")
    os.makedirs(os.path.dirname(ctx.out), exist_ok=True)
    sizes = [int(s) for s in ctx.sizes.split(",")]
    version = subprocess.run([ctx.droved, "--version"], capture_output=True, text=True).stdout.strip()
    data = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "version": version, "repeats": ctx.repeats, "idle": ctx.idle,
        "scrapes": ctx.scrapes, "lists": ctx.lists, "pools": [], "many": [],
    }
    workdir = tempfile.mkdtemp(prefix="drove-fleet-")
    try:
        for rep in range(ctx.repeats):
            # Alternate the order, so slow drift in the machine's load does
            # not always hit the same size.
            for n in (sizes if rep % 2 == 0 else sizes[::-1]):
                data["pools"].append(measure_pool(ctx, n, rep, workdir))
            if ctx.instances:
                data["many"].append(measure_many(ctx, rep, workdir))
    finally:
        raw = os.path.join(os.path.dirname(ctx.out), "fleet.raw")
        shutil.rmtree(raw, ignore_errors=True)
        shutil.copytree(workdir, raw)
        shutil.rmtree(workdir, ignore_errors=True)
    report(data, ctx.out)


if __name__ == "__main__":
    main()
