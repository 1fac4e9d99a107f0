# Used by bench/run --servers, which installs what this needs; run that, not this.
# SPDX-License-Identifier: MIT OR Apache-2.0
"""Issue 23: the real servers in drove's template mode against their peers.

gunicorn (sync and uvicorn's worker) through `python3 -m drove.gunicorn`
and Puma through ruby/bin/drove-puma, each in a static pool of 16 and a
dynamic one of 2..16, against the same server's own master (`--preload`
and not, Puma's cluster mode with preload) and drove exec, on the heavy
app (bench/heavy_app.py, bench/asgi_app.py: ~100 MB of objects at import)
and the light one. Reuses bench.py's Server, wrk, burst and steady
scenarios; adds per contender the time from start to a settled pool, the
PSS after the steady load, the machine's load average, and the fork cost of
the heavy template. See bench/README.md, "Template mode against the real
servers".
"""

import json
import os
import statistics
import subprocess
import time

import bench
from bench import BENCH, ROOT, log

UVICORN = "uvicorn_worker.UvicornWorker"
THREADS = "1:1"  # Puma: one request at a time per worker, like every other contender


class Peer(bench.Contender):
    """A contender of this benchmark. kind: drove (drove.gunicorn or
    drove-puma as the worker command), gunicorn, puma. server: gunicorn
    worker class ("sync" or UVICORN) or "puma"."""

    def __init__(self, name, label, kind, server, lo, hi, color, style="-", mode="template",
                 preload=False):
        super().__init__(name, label, kind, server, lo, hi, ("idle", "burst", "steady"), color,
                         style, mode=mode, preload=preload)
        self.server = server

    def app_args(self, app):
        if self.server == "puma":
            return [os.path.join(BENCH, "puma", "app.ru")]
        if self.server == UVICORN:
            return ["-k", UVICORN, "asgi_app:app"]
        return ["-k", "sync", "heavy_app:application" if app == "heavy" else "app:application"]

    def env(self, app):
        items = "200000" if app == "heavy" else "0"
        return {"HEAVY_ITEMS": items, "PYTHONPATH": os.path.join(ROOT, "python")}

    def argv(self, ctx, port, workdir):
        app = ctx.app
        if self.kind == "drove":
            if self.server == "puma":
                cmd = ["ruby", os.path.join(ROOT, "ruby", "bin", "drove-puma"), "-e", "production",
                       "-t", THREADS] + self.app_args(app)
            else:
                cmd = [ctx.python, "-m", "drove.gunicorn", "--no-control-socket", "--chdir", BENCH,
                       "--log-level", "warning"] + self.app_args(app)
            env = ", ".join(f"{k} = {json.dumps(v)}" for k, v in self.env(app).items())
            return self.droved_argv(ctx, port, workdir, cmd, 'ready_timeout = "120s"\n'
                                    f"allow_root = true\nenvironment = {{ {env} }}\n")
        if self.kind == "gunicorn":
            return [os.path.join(ctx.venv, "bin", "gunicorn"), "-w", str(self.max),
                    "-b", f"127.0.0.1:{port}", "--backlog", str(bench.BACKLOG), "--chdir", BENCH,
                    "--log-level", "warning", "--no-control-socket"] \
                + (["--preload"] if self.preload else []) + self.app_args(app)
        if self.kind == "puma":
            return ["puma", "-e", "production", "-w", str(self.max), "--preload", "-t", THREADS,
                    "-b", f"tcp://127.0.0.1:{port}?backlog={bench.BACKLOG}", "--no-config"] \
                + self.app_args(app)
        raise ValueError(self.kind)


def contenders():
    """Grouped by server: within a group, ratios are against its
    `gunicorn --preload` (or Puma cluster preload) row."""
    c = []
    for server, tag, colors in (("sync", "sync", ("#1f77b4", "#aec7e8", "#d62728", "#ff9896", "#7f7f7f")),
                                (UVICORN, "uv", ("#2ca02c", "#98df8a", "#9467bd", "#c5b0d5", None))):
        c += [
            Peer(f"gunicorn-preload-16-{tag}", f"gunicorn --preload -w 16 ({tag})", "gunicorn",
                 server, 16, 16, colors[0], "--", preload=True),
            Peer(f"gunicorn-16-{tag}", f"gunicorn -w 16 ({tag})", "gunicorn", server, 16, 16,
                 colors[1], ":"),
            Peer(f"drove-tpl-16-{tag}", f"drove template + gunicorn, static 16 ({tag})", "drove",
                 server, 16, 16, colors[2], "--"),
            Peer(f"drove-tpl-dyn-{tag}", f"drove template + gunicorn, 2..16 ({tag})", "drove",
                 server, 2, 16, colors[3]),
        ]
        if tag == "sync":
            c.append(Peer("drove-exec-16-sync", "drove exec + gunicorn, static 16 (sync)", "drove",
                          server, 16, 16, colors[4], ":", mode="exec"))
    c += [
        Peer("puma-preload-16", "Puma cluster -w 16 preload_app!", "puma", "puma", 16, 16,
             "#8c564b", "--", preload=True),
        Peer("drove-puma-16", "drove template + Puma, static 16", "drove", "puma", 16, 16,
             "#e377c2", "--"),
        Peer("drove-puma-dyn", "drove template + Puma, 2..16", "drove", "puma", 2, 16, "#f7b6d2"),
    ]
    return c


def pool_cpu_ticks(pid):
    return sum(bench.cpu_ticks(p) or 0 for p in [pid] + bench.descendants(pid))


def settle(srv, timeout):
    """Until the pool has its workers and has stopped loading: the whole
    tree used under 5 % of a core over 0.5 s (gunicorn without --preload
    has no readiness signal; its workers import the app after the fork).
    Returns the seconds from the server's start."""
    srv.wait_ready(timeout=timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        a = pool_cpu_ticks(srv.pid)
        time.sleep(0.5)
        if len(bench.children(srv.pid)) >= srv.c.min and \
                (pool_cpu_ticks(srv.pid) - a) / bench.CLK_TCK < 0.025:
            break
    return time.monotonic() - srv.started


def loadavg():
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def run_one(ctx, c, rep, args):
    """One fresh server: settle, idle, burst, steady `/` then `/work`, PSS."""
    res = {"contender": c.name, "repeat": rep, "app": ctx.app}
    res["busy_before"] = bench.wait_quiet(args.quiet_wait)
    res["loadavg_before"] = loadavg()
    workdir = os.path.join(ctx.raw, f"{ctx.app}-{c.name}-r{rep}")
    os.environ.update(c.env(ctx.app))  # gunicorn's and Puma's own masters read it from theirs
    t0 = time.monotonic()
    srv = bench.Server(ctx, c, workdir)
    srv.started = t0
    try:
        res["start_to_settled_s"] = settle(srv, args.start_timeout)
        log(f"{ctx.app} {c.name} r{rep}: settled after {res['start_to_settled_s']:.1f} s; idle {args.idle}s")
        res["idle"] = bench.scenario_idle(srv, args.idle)
        res["burst"] = bench.scenario_burst(srv, args.burst, args.burst_conns, args.burst_path)
        b = res["burst"]
        log(f"  burst {b.get('rps')} req/s p99 {b.get('p99_ms')} ms (raw {b.get('log_p99_ms')}) "
            f"to-16 {b['time_to_max_ms']} ms ready {b['time_to_max_ready_ms']} ms")
        res["steady"] = bench.scenario_steady(srv, [("hello", "/", 32)], args.warm, args.steady_hello)
        res["steady"].update(bench.scenario_steady(srv, [("work", "/work", 32)], args.warm, args.steady_work))
        res["after_steady"] = bench.footprint(srv.pid)
        # The pool without its supervisor when that is droved (its own PSS
        # apart): droved is not part of the server being compared.
        if c.kind == "drove":
            res["after_steady"]["pool_pss_kb"] = res["after_steady"]["total_pss_kb"] - res["after_steady"]["sup_pss_kb"]
        else:
            res["after_steady"]["pool_pss_kb"] = res["after_steady"]["total_pss_kb"]
        res["loadavg_after"] = loadavg()
        s = res["steady"]
        log(f"  steady / {s['hello'].get('rps')} req/s, /work {s['work'].get('rps')} req/s; "
            f"PSS {res['after_steady']['pool_pss_kb'] / 1024:.0f} MB; load {res['loadavg_after'][0]}")
    finally:
        srv.stop()
    if c.kind == "drove":
        with open(os.path.join(workdir, "server.log")) as f:
            res["burst"]["scale_log"] = [line.rstrip() for line in f if 'event="scale' in line]
    return res


FORK_PROBE = r"""
import gc, os, sys, time
sys.path.insert(0, sys.argv[1])
freeze = sys.argv[2] == "1"
t = time.perf_counter()
import heavy_app
load = time.perf_counter() - t
if freeze:
    gc.freeze()
def once(double):
    r, w = os.pipe()
    t = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        if double:  # the adapter's double fork: the worker is a grandchild
            if os.fork():
                os._exit(0)
        os.write(w, b"x")
        os._exit(0)
    os.read(r, 1)  # the (grand)child runs
    dt = time.perf_counter() - t
    os.waitpid(pid, 0)
    os.close(r); os.close(w)
    return dt * 1000
single = sorted(once(False) for _ in range(20))
double = sorted(once(True) for _ in range(20))
rss = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
print(f"{load:.3f} {single[10]:.2f} {double[10]:.2f} {rss:.0f}")
"""


def fork_cost(python):
    """Median ms for fork() (+ the child running) and for a double fork,
    in a process that has imported the heavy app; with and without
    gc.freeze()."""
    out = {}
    for freeze in (True, False):
        r = subprocess.run([python, "-c", FORK_PROBE, BENCH, "1" if freeze else "0"],
                           capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, HEAVY_ITEMS="200000"))
        load, single, double, rss = r.stdout.split()
        out["freeze" if freeze else "no_freeze"] = {
            "import_s": float(load), "fork_ms": float(single), "double_fork_ms": float(double),
            "rss_mb": float(rss)}
    out["loadavg"] = loadavg()
    return out


def replace_heavy(ctx, args):
    """bench/replace.py with the heavy app under drove.gunicorn: kill ->
    replacement READY=1, exec against template mode."""
    argv = [ctx.python, os.path.join(BENCH, "replace.py"), "--droved", ctx.droved,
            "--python", ctx.python, "--kills", str(args.kills), "--app", "heavy", "--json"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        log(f"replace.py failed: {r.stderr[-2000:]}")
        return {"failed": r.stderr[-2000:]}
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["loadavg"] = loadavg()
    return out


def main(args, ctx):
    import servers_report

    out = args.out
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "servers.json")
    if args.report_only:
        with open(path) as f:
            servers_report.write(json.load(f), out)
        return
    ctx.raw = os.path.join(out, "servers.raw")
    os.makedirs(ctx.raw, exist_ok=True)
    cs = contenders()
    if args.only:
        names = args.only.split(",")
        unknown = set(names) - {c.name for c in cs}
        if unknown:
            raise SystemExit(f"unknown contenders {sorted(unknown)}; known: {[c.name for c in cs]}")
        cs = [c for c in cs if c.name in names]
    data = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "versions": bench.versions(ctx),
        "params": {k: v for k, v in vars(args).items() if k not in ("droved", "rust_worker", "venv", "out")},
        "contenders": [{"name": c.name, "label": c.label, "kind": c.kind, "server": c.server,
                        "min": c.min, "max": c.max, "mode": c.mode, "color": c.color,
                        "style": c.style} for c in cs],
        "runs": [],
    }
    data["versions"]["puma"] = subprocess.run(["puma", "--version"], capture_output=True, text=True).stdout.strip()

    def save():
        with open(path, "w") as f:
            json.dump(data, f)

    t_start = time.monotonic()
    if "fork" in args.parts:
        data["fork"] = fork_cost(ctx.python)
        log(f"fork cost of the heavy template: {data['fork']}")
        save()
    if "pools" in args.parts:
        for app in args.apps.split(","):
            ctx.app = app
            # Puma has one app (bench/puma/app.ru, ~40 MB at boot): run it once.
            group = [c for c in cs if not (c.server == "puma" and app != "heavy")]
            for rep in range(1, args.repeats + 1):
                k = (rep - 1) % len(group)
                for c in group[k:] + group[:k]:
                    try:
                        data["runs"].append(run_one(ctx, c, rep, args))
                    except Exception as e:  # one broken contender must not lose the rest
                        log(f"{app} {c.name} r{rep}: FAILED: {e}")
                        data["runs"].append({"contender": c.name, "repeat": rep, "app": app,
                                             "failed": str(e)})
                    save()
    if "replace" in args.parts:
        data["replace"] = replace_heavy(ctx, args)
        log(f"replacement: {data['replace']}")
    data["duration_s"] = round(time.monotonic() - t_start)
    save()
    servers_report.write(data, out)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None
