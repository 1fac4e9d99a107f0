# Used by bench/upgrade, which installs what this needs; run that, not this.
# SPDX-License-Identifier: MIT OR Apache-2.0
"""Upgrade and reload under load: drove against gunicorn and uWSGI (issue 6).

For each scenario (a contender and one kind of operation) a fresh pool of 8
workers of bench/app.py serves `wrk -t2 -c64` on /sleep?ms=20 for a fixed
window, and N operations are performed, spaced evenly, each waited for
until the contender says (or shows) it is done. Reported per scenario:
requests ok and failed, throughput in 1 s buckets and its dip (worst bucket
/ median bucket), p99, how long each operation took, and whether the
supervisor's PID stayed the same. See bench/README.md, "Upgrade and reload".
"""

import argparse
import ctypes
import json
import os
import re
import shutil
import signal
import statistics
import sys
import threading
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)

import bench  # noqa: E402  (bench/bench.py: contenders, Server, wrk, /proc helpers)
from bench import CLK_TCK, children, log  # noqa: E402

POOL = 8
PR_SET_CHILD_SUBREAPER = 36


class Op:
    """One kind of operation on one contender."""

    def __init__(self, name, kind, op, label, color):
        self.name, self.kind, self.op, self.label, self.color = name, kind, op, label, color


SCENARIOS = [
    Op("drove-upgrade", "drove", "upgrade", "drove: binary upgrade (SIGUSR2, re-exec in place)", "#d62728"),
    Op("drove-reload", "drove", "reload", "drove: reload (SIGHUP, rolling restart gated on READY=1)", "#ff7f0e"),
    Op("gunicorn-hup", "gunicorn", "hup", "gunicorn: HUP (new workers, old ones stopped)", "#1f77b4"),
    Op("gunicorn-usr2", "gunicorn", "usr2", "gunicorn: USR2 + TERM old master (upgrade dance)", "#17becf"),
    Op("uwsgi-chain", "uwsgi", "chain", "uWSGI: chain reload (master FIFO `c`)", "#2ca02c"),
    Op("uwsgi-reload", "uwsgi", "reload", "uWSGI: graceful reload (SIGHUP)", "#98df8a"),
]

GUNICORN_CONF = '''\
# written by bench/upgrade.py: only logs when a worker has loaded the app
# (gunicorn has no readiness signal of its own); changes nothing else.
def post_worker_init(worker):
    worker.log.warning("bench: worker %s ready", worker.pid)
'''


class UpgradeContender(bench.Contender):
    """bench.py's contender with 8 workers plus what the operation needs: a
    pidfile and a readiness log line for gunicorn, a master FIFO for uWSGI."""

    def __init__(self, sc):
        super().__init__(sc.name, sc.label, sc.kind, "py", POOL, POOL, (), sc.color)
        self.sc = sc

    def argv(self, ctx, port, workdir):
        argv = super().argv(ctx, port, workdir)
        if self.kind == "gunicorn":
            conf = os.path.join(workdir, "gunicorn.conf.py")
            with open(conf, "w") as f:
                f.write(GUNICORN_CONF)
            extra = ["-c", conf, "--pid", os.path.join(workdir, "gunicorn.pid")]
            argv = argv[:-1] + extra + argv[-1:]
        elif self.kind == "uwsgi":
            argv += ["--master-fifo", os.path.join(workdir, "uwsgi.fifo")]
        return argv


# ------------------------------------------------------------------ helpers


class LogTail:
    """Reads a server's log as it grows."""

    def __init__(self, path):
        self.path, self.pos = path, 0

    def lines(self):
        try:
            with open(self.path, errors="replace") as f:
                f.seek(self.pos)
                data = f.read()
        except OSError:
            return []
        cut = data.rfind("\n") + 1
        self.pos += len(data[:cut].encode(errors="replace"))
        return data[:cut].splitlines()


READY_LINE = {
    "gunicorn": re.compile(r"bench: worker (\d+) ready"),
    "uwsgi": re.compile(r"WSGI app \d+ .*ready in .* pid: (\d+)"),
}


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def reap(pid=-1):
    """Reap gunicorn's old masters (ours: the first is the server we started,
    later ones are orphans this process adopted as subreaper). Only pid=-1
    once wrk has exited: it is a child too."""
    while True:
        try:
            got, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if got == 0 or pid != -1:
            return


def read_pid(path):
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def session_procs(sid):
    """pid -> cpu ticks of every live process in session sid (the server's)."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[0] = state (field 3), fields[3] = session (field 6)
        if fields[0] != "Z" and int(fields[3]) == sid:
            out[int(name)] = int(fields[11]) + int(fields[12])
    return out


def proc_ticks(pids):
    out = {}
    for p in pids:
        t = bench.cpu_ticks(p)
        if t is not None:
            out[p] = t
    return out


class SessionSampler:
    """Every 0.1 s: how many processes the contender has (masters + workers,
    so doubled pools show) and the CPU they used. Its processes are those in
    the server's session (gunicorn's old and new masters) plus the current
    master's descendants (droved starts each worker in a session of its own)."""

    def __init__(self, sid, master, every=0.1):
        self.sid, self.master, self.every = sid, master, every
        self.counts = []
        self.first, self.last = {}, {}
        self.stop = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        nxt = time.monotonic()
        while not self.stop:
            m = self.master()
            procs = session_procs(self.sid)
            procs.update(proc_ticks([m] + bench.descendants(m)))
            self.counts.append((time.monotonic(), len(procs)))
            for p, t in procs.items():
                self.first.setdefault(p, t if not self.counts[:-1] else 0)
                self.last[p] = t
            nxt += self.every
            time.sleep(max(0.0, nxt - time.monotonic()))

    def close(self):
        self.stop = True
        self.thread.join()
        return sum(self.last[p] - self.first[p] for p in self.last) / CLK_TCK


# ------------------------------------------------------------------ operations


class Target:
    """The running contender plus what performing its operation needs."""

    def __init__(self, srv, sc, droved_src=None):
        self.srv, self.sc = srv, sc
        self.master = srv.pid  # changes with gunicorn's USR2 dance
        self.log = LogTail(os.path.join(srv.workdir, "server.log"))
        self.droved_src = droved_src
        self.ready_pids = set()  # workers that logged "ready" (gunicorn, uWSGI)
        self.chains_done = 0  # uWSGI's "chain reloading complete" lines

    def poll_log(self):
        lines = self.log.lines()
        rx = READY_LINE.get(self.sc.kind)
        if rx:
            for line in lines:
                if "chain reloading complete" in line:
                    self.chains_done += 1
                m = rx.search(line)
                if m:
                    self.ready_pids.add(int(m.group(1)))
        return lines

    def wait(self, cond, deadline, every=0.02):
        while time.monotonic() < deadline:
            self.poll_log()
            if cond():
                return True
            time.sleep(every)
        return False

    def new_pool_ready(self, master, old):
        """All old workers gone; `master` has POOL children that said ready."""
        kids = set(children(master))
        return not any(alive(p) for p in old) and len(kids & self.ready_pids - old) >= POOL

    def perform(self, timeout):
        """Do the operation once; return a dict with at least sent/done
        (monotonic) or an error."""
        sc, srv = self.sc, self.srv
        self.poll_log()
        old = set(children(self.master))
        deadline = time.monotonic() + timeout
        r = {}
        if sc.kind == "drove":
            if sc.op == "upgrade":
                # A "new build" at droved's path: a fresh copy, renamed over it.
                path = srv.droved_path
                shutil.copy2(self.droved_src, path + ".new")
                os.rename(path + ".new", path)
            n0 = len(srv.notify.ready_at)
            r["sent"] = time.monotonic()
            os.kill(self.master, signal.SIGUSR2 if sc.op == "upgrade" else signal.SIGHUP)
            ok = self.wait(lambda: len(srv.notify.ready_at) > n0, deadline)
            if ok:
                r["done"] = srv.notify.ready_at[n0]
        elif sc.kind == "gunicorn" and sc.op == "hup":
            r["sent"] = time.monotonic()
            os.kill(self.master, signal.SIGHUP)
            ok = self.wait(lambda: self.new_pool_ready(self.master, old), deadline)
            r["done"] = time.monotonic()
        elif sc.kind == "gunicorn" and sc.op == "usr2":
            pidfile = os.path.join(srv.workdir, "gunicorn.pid")
            old_master = self.master
            r["sent"] = time.monotonic()
            os.kill(old_master, signal.SIGUSR2)
            # 1. the new master writes gunicorn.pid.2 and starts its workers;
            #    wait until all of them have loaded the app
            ok = self.wait(lambda: read_pid(pidfile + ".2") not in (None, old_master), deadline)
            new_master = read_pid(pidfile + ".2") if ok else None
            ok = ok and self.wait(lambda: self.new_pool_ready(new_master, set()), deadline)
            r["new_master_up"] = time.monotonic()
            # 2. TERM the old master: graceful, its workers finish their
            #    requests (WINCH is ignored unless gunicorn daemonized, QUIT is
            #    gunicorn's quick shutdown)
            if ok:
                os.kill(old_master, signal.SIGTERM)
                ok = self.wait(lambda: not alive(old_master), deadline)
                reap(old_master)
            # 3. the new master notices its parent left and renames
            #    gunicorn.pid.2 to gunicorn.pid ("Master has been promoted");
            #    only then does it accept the next USR2
            ok = ok and self.wait(lambda: read_pid(pidfile) == new_master
                                  and not os.path.exists(pidfile + ".2"), deadline)
            if new_master:
                self.master = new_master
            r["done"] = time.monotonic()
        elif sc.kind == "uwsgi":
            chains = self.chains_done
            r["sent"] = time.monotonic()
            if sc.op == "chain":
                with open(os.path.join(srv.workdir, "uwsgi.fifo"), "w") as f:
                    f.write("c")
                # uWSGI ignores a `c` until it has logged the last one complete
                ok = self.wait(lambda: self.new_pool_ready(self.master, old)
                               and self.chains_done > chains, deadline)
            else:
                os.kill(self.master, signal.SIGHUP)
                ok = self.wait(lambda: self.new_pool_ready(self.master, old), deadline)
            r["done"] = time.monotonic()
        else:
            raise ValueError(sc.name)
        if not ok:
            r.pop("done", None)
            r["error"] = f"not done after {timeout:.0f} s"
        return r


# ------------------------------------------------------------------ one scenario


def bucketize(reqs, start, secs):
    """Successful responses per 1 s bucket, by completion time."""
    b = [0] * secs
    for t, lat, st in reqs:
        k = int(t + lat / 1e3 - start)
        if 0 <= k < secs and 200 <= st < 300:
            b[k] += 1
    return b


def run_scenario(ctx, sc, args):
    workdir = os.path.join(ctx.raw, sc.name)
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    c = UpgradeContender(sc)
    sctx = ctx
    if sc.kind == "drove":
        # droved runs from a copy in the scenario's directory, so each upgrade
        # can put a "new build" at its path.
        class SCtx:
            pass
        sctx = SCtx()
        sctx.__dict__.update(ctx.__dict__)
        sctx.droved = os.path.join(workdir, "droved")
        shutil.copy2(ctx.droved, sctx.droved)
    busy_before = bench.wait_quiet(args.quiet_wait)
    srv = bench.Server(sctx, c, workdir)
    srv.droved_path = getattr(sctx, "droved", None)
    tgt = Target(srv, sc, ctx.droved)
    res = {"scenario": sc.name, "label": sc.label, "busy_before_pct": round(busy_before, 1)}
    try:
        srv.wait_ready()
        tgt.poll_log()
        logdir = os.path.join(workdir, "wrk")
        os.makedirs(logdir)
        sampler = SessionSampler(srv.pid, lambda: tgt.master)
        m0 = bench.machine_ticks()
        out = {}

        def load():
            out["text"] = bench.wrk(srv.url, args.path, args.conns, args.window,
                                    script=os.path.join(BENCH, "burst.lua"), logdir=logdir)
            out["cpu_s"] = bench.wrk.cpu_s

        t0 = time.monotonic()
        th = threading.Thread(target=load)
        th.start()
        log(f"{sc.name}: {args.window} s of wrk -c{args.conns} {args.path}, {args.ops} operations")
        ops = []
        for i in range(args.ops):
            at = t0 + args.window * (i + 1) / (args.ops + 1)
            time.sleep(max(0.0, at - time.monotonic()))
            if time.monotonic() > t0 + args.window - 2:
                # the previous ones took so long that this one would not
                # happen under load: not done (the table says k/N)
                log(f"  op {i + 1}: skipped, the window is over")
                break
            r = tgt.perform(args.op_timeout)
            r["late_s"] = round(max(0.0, r["sent"] - at), 3)
            ops.append(r)
            took = r["done"] - r["sent"] if "done" in r else None
            log(f"  op {i + 1}: " + (f"done in {took:.2f} s" if took is not None else r["error"])
                + (f" (master {tgt.master})" if tgt.master != srv.pid else ""))
        th.join()
        m1 = bench.machine_ticks()
        session_cpu = sampler.close()
        dt = time.monotonic() - t0
        with open(os.path.join(logdir, "wrk.out"), "w") as f:
            f.write(out["text"])
        r = bench.parse_wrk(out["text"])
        reqs = bench.read_wrk_logs(logdir)
        start = reqs[0][0] if reqs else t0
        buckets = bucketize(reqs, start, args.window)
        # the first and the last bucket may be partial (wrk starting, stopping)
        inner = buckets[1:-1] or buckets
        medb = statistics.median(inner) if inner else 0
        worst = min(range(1, len(buckets) - 1), key=lambda k: buckets[k]) if len(buckets) > 2 else 0
        lats = sorted(lat for _, lat, st in reqs if 200 <= st < 300)
        non2xx_log = sum(1 for _, _, st in reqs if not 200 <= st < 300)
        cores = os.cpu_count() or 1
        busy_s = (m1[0] - m0[0]) / CLK_TCK
        final_master = tgt.master
        res.update(
            wrk=r,
            requests=r.get("requests"),
            ok=(r.get("requests") or 0) - r.get("non2xx", 0),
            failed=r["errors"],
            socket_errors=r.get("socket_errors"),
            non2xx=r.get("non2xx", 0),
            non2xx_logged=non2xx_log,
            rps=r.get("rps"),
            p99_ms=r.get("p99_ms"),
            log_p99_ms=lats[min(len(lats) - 1, int(len(lats) * 0.99))] if lats else None,
            max_ms=r.get("lat_max_ms"),
            buckets=buckets,
            median_bucket=medb,
            worst_bucket=buckets[worst] if buckets else None,
            worst_bucket_at=worst,
            dip=round(buckets[worst] / medb, 3) if medb else None,
            # requests short of the median, summed over the buckets below it
            deficit=round(sum(max(0.0, medb - b) for b in inner)),
            ops=[{k: (round(v - start, 3) if k in ("sent", "done", "new_master_up") else v)
                  for k, v in o.items()} for o in ops],
            op_s=[round(o["done"] - o["sent"], 3) for o in ops if "done" in o],
            op_errors=[o["error"] for o in ops if "error" in o],
            pid_start=srv.pid,
            pid_end=final_master,
            pid_same=final_master == srv.pid and alive(srv.pid),
            workers_end=len(children(final_master)),
            procs=[(round(t - start, 2), n) for t, n in sampler.counts],
            peak_procs=max((n for _, n in sampler.counts), default=0),
            load={
                "machine_busy_pct": round(100.0 * busy_s / (dt * cores), 1),
                "session_cpu_pct": round(100.0 * session_cpu / (dt * cores), 1),
                "wrk_cpu_pct": round(100.0 * out["cpu_s"] / (dt * cores), 1),
                "other_cpu_pct": round(max(0.0, 100.0 * (busy_s - session_cpu - out["cpu_s"]) / (dt * cores)), 1),
            },
        )
        log(f"  {res['ok']} ok, {res['failed']} failed {r.get('socket_errors')}, "
            f"dip {res['dip']} ({res['worst_bucket']} / {medb} req/s), p99 {res['p99_ms']} ms, "
            f"ops {res['op_s']}, pid same {res['pid_same']}, other load {res['load']['other_cpu_pct']}%")
    finally:
        # Stop whichever master is current (gunicorn's changes), gracefully.
        if tgt.master != srv.pid and alive(tgt.master):
            os.kill(tgt.master, signal.SIGTERM)
            deadline = time.monotonic() + 15
            while alive(tgt.master) and time.monotonic() < deadline:
                reap(tgt.master)
                time.sleep(0.05)
        srv.stop()
        reap()
    with open(os.path.join(workdir, "server.log"), errors="replace") as f:
        keep = re.compile(r"upgrade|took over|rolling|reload|preflight|error|warn|fail|refus|abort"
                          r"|chain|Master|Hang up|Booting|graceful|respawn", re.I)
        res["log_excerpt"] = [line.rstrip()[:300] for line in f if keep.search(line)][:400]
    return res


# ------------------------------------------------------------------ main


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="smoke run: 12 s windows, 2 operations")
    ap.add_argument("--window", type=int, default=40, help="load window per scenario, s")
    ap.add_argument("--ops", type=int, default=5, help="operations per scenario, spaced evenly")
    ap.add_argument("--op-timeout", type=float, default=30.0, help="give up waiting for one operation after, s")
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--path", default="/sleep?ms=20")
    ap.add_argument("--only", help="comma-separated scenarios: " + ",".join(s.name for s in SCENARIOS))
    ap.add_argument("--quiet-wait", type=float, default=30.0,
                    help="wait up to this long for other load on the machine to stop before each scenario")
    ap.add_argument("--out", default=os.path.join(BENCH, "results"))
    ap.add_argument("--droved", required=True)
    ap.add_argument("--venv", required=True)
    ap.add_argument("--report-only", action="store_true", help="redo upgrade.md and upgrade.png from upgrade.json")
    args = ap.parse_args()
    if args.quick:
        args.window, args.ops = 12, 2
        args.quiet_wait = min(args.quiet_wait, 10.0)
        if args.out == os.path.join(BENCH, "results"):
            args.out = os.path.join(BENCH, "results", "quick.raw")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "upgrade.json")

    import upgrade_report  # noqa: E402 (needs matplotlib from the venv)

    if args.report_only:
        with open(path) as f:
            upgrade_report.write(json.load(f), args.out)
        return

    # gunicorn's USR2 dance leaves the new master an orphan when the old one
    # exits: adopt it, so it can be watched, stopped and reaped.
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log("warning: cannot become a child subreaper; gunicorn's new masters go to init")

    class Ctx:
        pass

    ctx = Ctx()
    ctx.droved, ctx.venv = os.path.abspath(args.droved), args.venv
    ctx.rust_worker = None
    ctx.python = os.path.join(args.venv, "bin", "python")
    ctx.raw = os.path.join(args.out, "upgrade.raw")
    os.makedirs(ctx.raw, exist_ok=True)
    scs = SCENARIOS
    if args.only:
        names = args.only.split(",")
        unknown = set(names) - {s.name for s in SCENARIOS}
        if unknown:
            sys.exit(f"unknown scenarios {sorted(unknown)}; known: {[s.name for s in SCENARIOS]}")
        scs = [s for s in SCENARIOS if s.name in names]
    data = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "versions": bench.versions(ctx),
        "params": {k: v for k, v in vars(args).items() if k not in ("droved", "venv", "out")},
        "pool": POOL,
        "scenarios": [{"name": s.name, "label": s.label, "kind": s.kind, "op": s.op, "color": s.color}
                      for s in scs],
        "runs": [],
    }
    t_start = time.monotonic()
    for sc in scs:
        try:
            data["runs"].append(run_scenario(ctx, sc, args))
        except Exception as e:  # one broken contender must not lose the rest
            log(f"{sc.name}: FAILED: {e!r}")
            data["runs"].append({"scenario": sc.name, "label": sc.label, "failed": repr(e)})
        with open(path, "w") as f:
            json.dump(data, f)
    data["duration_s"] = round(time.monotonic() - t_start)
    with open(path, "w") as f:
        json.dump(data, f)
    log(f"done in {data['duration_s']} s")
    upgrade_report.write(data, args.out)


if __name__ == "__main__":
    main()
