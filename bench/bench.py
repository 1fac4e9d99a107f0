# Used by bench/run, which installs what this needs; run that, not this.
# SPDX-License-Identifier: MIT OR Apache-2.0
"""drove against gunicorn and uWSGI: overhead, burst and idle footprint.

bench/run builds droved, installs wrk and a venv (gunicorn, uWSGI,
matplotlib), then runs this with the venv's python. See bench/README.md for
what is measured and how to read the results.
"""

import argparse
import json
import os
import platform
import resource
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
CLK_TCK = os.sysconf("SC_CLK_TCK")
BACKLOG = 1024
MIN, MAX = 2, 16


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ /proc


def children(pid):
    """Direct children of pid, over all its threads."""
    out = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(x) for x in f.read().split())
        except OSError:
            pass
    return out


def descendants(pid):
    out, todo = [], children(pid)
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children(p))
    return out


def cpu_ticks(pid):
    """utime + stime of pid, in clock ticks (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # fields 14, 15 of stat(5)
    except (OSError, IndexError, ValueError):
        return None


def status_kb(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def pss_kb(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def machine_ticks():
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    total = sum(v[:8])
    return total - idle, total


# ------------------------------------------------------------------ contenders


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Contender:
    """One server setup. `argv(port, workdir)` says how to start it; the
    process started is the supervisor whose children are the workers."""

    def __init__(self, name, label, kind, worker, lo, hi, scenarios, color, style="-",
                 mode="exec", preload=False):
        self.name, self.label, self.kind, self.worker = name, label, kind, worker
        self.min, self.max = lo, hi
        self.scenarios = scenarios
        self.color, self.style = color, style
        # drove: worker.mode ("exec" or "template"); gunicorn: --preload;
        # uWSGI: preload means without --lazy-apps (load once, then fork).
        self.mode, self.preload = mode, preload

    def droved_argv(self, ctx, port, workdir, cmd, extra=""):
        """Writes workdir/drove.toml for a pool of `cmd` (`extra`: more
        [worker] settings) and returns droved's argv."""
        conf = os.path.join(workdir, "drove.toml")
        with open(conf, "w") as f:
            f.write(
                "# written by bench/bench.py; everything not set here is droved's default\n"
                f'[listen]\naddresses = ["127.0.0.1:{port}"]\nbacklog = {BACKLOG}\n'
                f"[worker]\ncommand = {json.dumps(cmd)}\nready = \"notify\"\n"
                f"mode = \"{self.mode}\"\n{extra}"
                f"[pool]\nmin = {self.min}\nmax = {self.max}\n"
            )
        return [ctx.droved, "-c", conf, "--instance", self.name]

    @property
    def dynamic(self):
        return self.min != self.max

    def argv(self, ctx, port, workdir):
        py = ctx.python
        app = os.path.join(BENCH, "app.py")
        if self.kind == "drove":
            if self.worker == "py":
                cmd = [py, os.path.join(ROOT, "examples", "wsgi_worker.py"), app + ":application"]
            else:
                cmd = [ctx.rust_worker]
            return self.droved_argv(ctx, port, workdir, cmd)
        if self.kind == "gunicorn":
            return [
                os.path.join(ctx.venv, "bin", "gunicorn"),
                "-k", "sync", "-w", str(self.max),
                "-b", f"127.0.0.1:{port}", "--backlog", str(BACKLOG),
                "--chdir", BENCH, "--log-level", "warning",
            ] + (["--preload"] if self.preload else []) + ["app:application"]
        if self.kind == "uwsgi":
            argv = [
                os.path.join(ctx.venv, "bin", "uwsgi"),
                "--master", "--http-socket", f"127.0.0.1:{port}",
                "--wsgi-file", app, "--processes", str(self.max),
                "--listen", str(BACKLOG),
                "--add-header", "Connection: close",
                "--die-on-term", "--disable-logging",
                "--need-app",
            ]
            if not self.preload:
                argv.append("--lazy-apps")
            if self.dynamic:
                argv += [
                    "--cheaper", str(self.min), "--cheaper-initial", str(self.min),
                    "--cheaper-algo", "backlog", "--cheaper-step", str(self.step),
                ]
            return argv
        if self.kind == "bare":
            if self.worker == "py":
                cmd = [py, os.path.join(ROOT, "examples", "wsgi_worker.py"), app + ":application"]
            else:
                cmd = [ctx.rust_worker]
            return [py, os.path.join(BENCH, "bare_pool.py"), f"127.0.0.1:{port}", str(BACKLOG),
                    str(self.max), "--"] + cmd
        raise ValueError(self.kind)


def contenders():
    full = ("idle", "burst", "steady")
    c = [
        Contender("drove-dyn", "drove 2..16", "drove", "py", MIN, MAX, full, "#d62728"),
        Contender("drove-16", "drove static 16", "drove", "py", MAX, MAX, full, "#ff9896", "--"),
        Contender("gunicorn-16", "gunicorn -w 16", "gunicorn", "py", MAX, MAX, full, "#1f77b4", "--"),
        Contender("gunicorn-2", "gunicorn -w 2", "gunicorn", "py", MIN, MIN, full, "#9edae5", ":"),
        Contender("uwsgi-cheaper4", "uWSGI cheaper 2..16 step 4", "uwsgi", "py", MIN, MAX, full, "#2ca02c"),
        Contender("uwsgi-16", "uWSGI 16", "uwsgi", "py", MAX, MAX, full, "#98df8a", "--"),
        Contender("drove-tpl-dyn", "drove template 2..16", "drove", "py", MIN, MAX, full,
                  "#9467bd", mode="template"),
        Contender("drove-tpl-16", "drove template static 16", "drove", "py", MAX, MAX, full,
                  "#c5b0d5", "--", mode="template"),
        Contender("gunicorn-preload-16", "gunicorn --preload -w 16", "gunicorn", "py", MAX, MAX,
                  full, "#17becf", "--", preload=True),
        Contender("uwsgi-preload-16", "uWSGI 16 without --lazy-apps", "uwsgi", "py", MAX, MAX,
                  full, "#8c564b", "--", preload=True),
        Contender("drove-rust-16", "drove static 16, Rust worker", "drove", "rust", MAX, MAX,
                  ("idle", "steady"), "#7f7f7f", "--"),
        Contender("bare-py-16", "no supervisor, 16 Python workers", "bare", "py", MAX, MAX,
                  ("steady",), "#bcbd22", ":"),
        Contender("bare-rust-16", "no supervisor, 16 Rust workers", "bare", "rust", MAX, MAX,
                  ("steady",), "#c7c7c7", ":"),
    ]
    c[4].step = 4
    return c


class NotifyReceiver:
    """Receives droved's sd_notify datagrams (READY=1, STATUS=...) and
    timestamps them, so drove's ready-worker count is known to the ms."""

    STATUS = re.compile(r"(\d+) workers? ready .*queue (\d+|\?)")

    def __init__(self, path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.events = []  # (monotonic, ready, queue)
        self.ready_at = []  # monotonic time of every READY=1 (start-up, each upgrade, each rollout)
        self.stop = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop:
            try:
                data = self.sock.recv(4096).decode(errors="replace")
            except socket.timeout:
                continue
            except OSError:
                return
            now = time.monotonic()
            for line in data.splitlines():
                if line == "READY=1":
                    self.ready_at.append(now)
                if line.startswith("STATUS="):
                    m = self.STATUS.search(line)
                    if m:
                        q = int(m.group(2)) if m.group(2).isdigit() else None
                        self.events.append((now, int(m.group(1)), q))

    def close(self):
        self.stop = True
        self.thread.join()
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


class Server:
    """A running contender."""

    def __init__(self, ctx, contender, workdir):
        self.c = contender
        self.port = free_port()
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        self.notify = None
        if contender.kind == "drove":
            npath = os.path.join(workdir, "notify.sock")
            self.notify = NotifyReceiver(npath)
            env["NOTIFY_SOCKET"] = npath
        argv = contender.argv(ctx, self.port, workdir)
        with open(os.path.join(workdir, "argv.json"), "w") as f:
            json.dump(argv, f)
        self.err = open(os.path.join(workdir, "server.log"), "w")
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=self.err,
            stderr=self.err, start_new_session=True,
        )
        self.pid = self.proc.pid
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout=30.0):
        """Until the pool has its initial workers and answers; then a short
        settle so lazily loaded apps have finished importing."""
        want = self.c.min
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.c.name} exited with {self.proc.returncode}; see {self.workdir}/server.log")
            if len(children(self.pid)) >= want and self.get("/"):
                if self.notify is None or any(r >= want for _, r, _ in self.notify.events):
                    time.sleep(1.0)
                    return
            time.sleep(0.05)
        raise RuntimeError(f"{self.c.name} not ready after {timeout} s; see {self.workdir}/server.log")

    def get(self, path):
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                s.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
                head = s.recv(64)
                return head.startswith(b"HTTP/1.") and head.split(b" ")[1] == b"200"
        except OSError:
            return False

    def stop(self):
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                log(f"{self.c.name}: no exit 15 s after SIGTERM, killing its process group")
                os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait()
        # Anything left in its session (a worker that outlived its master).
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.err.close()
        if self.notify:
            self.notify.close()


# ------------------------------------------------------------------ wrk

UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def ms(text):
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    return float(m.group(1)) * UNITS[m.group(2)] if m else None


def parse_wrk(out):
    r = {"errors": 0, "non2xx": 0}
    m = re.search(r"Latency\s+(\S+)\s+(\S+)\s+(\S+)", out)
    if m:
        r["lat_avg_ms"], r["lat_max_ms"] = ms(m.group(1)), ms(m.group(3))
    for pct in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        if m:
            r[f"p{pct}_ms"] = ms(m.group(1))
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    if m:
        r["requests"] = int(m.group(1))
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m:
        r["rps"] = float(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        r["socket_errors"] = dict(zip(("connect", "read", "write", "timeout"), map(int, m.groups())))
        r["errors"] += sum(map(int, m.groups()))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        r["non2xx"] = int(m.group(1))
        r["errors"] += int(m.group(1))
    return r


def wrk(url, path, conns, secs, latency=True, script=None, logdir=None, timeout="10s"):
    argv = ["wrk", "-t2", f"-c{conns}", f"-d{secs}s", f"--timeout={timeout}"]
    if latency:
        argv.append("--latency")
    env = dict(os.environ)
    if script:
        argv += ["-s", script]
        env["BENCH_PATH"] = path
        env["BENCH_LOG_DIR"] = logdir
        target = url + "/"
    else:
        target = url + path
    with open(os.devnull, "w") as devnull, tempfile.TemporaryFile("w+") as buf:
        proc = subprocess.Popen(argv + [target], env=env, stdout=buf, stderr=devnull)
        timer = threading.Timer(secs + 60, proc.kill)
        timer.start()
        _, _, ru = os.wait4(proc.pid, 0)
        timer.cancel()
        proc.returncode = 0
        buf.seek(0)
        out = buf.read()
    wrk.cpu_s = ru.ru_utime + ru.ru_stime
    return out


class Foreign:
    """CPU used during a phase by processes that are neither the contender
    (supervisor and workers), nor wrk, nor this script: other load on the
    machine, which makes the phase's numbers suspect. Call wrk() inside."""

    def __init__(self, pid):
        self.pid = pid
        self.t0 = time.monotonic()
        self.m0 = machine_ticks()
        self.tree0 = {p: cpu_ticks(p) or 0 for p in [pid] + descendants(pid)}
        self.self0 = resource.getrusage(resource.RUSAGE_SELF)

    def end(self, wrk_cpu_s):
        dt = time.monotonic() - self.t0
        m1 = machine_ticks()
        tree1 = {p: cpu_ticks(p) for p in [self.pid] + descendants(self.pid)}
        tree = sum(max(0, (v or 0) - self.tree0.get(p, 0)) for p, v in tree1.items())
        self1 = resource.getrusage(resource.RUSAGE_SELF)
        me = (self1.ru_utime + self1.ru_stime) - (self.self0.ru_utime + self.self0.ru_stime)
        busy_s = (m1[0] - self.m0[0]) / CLK_TCK
        foreign = busy_s - tree / CLK_TCK - wrk_cpu_s - me
        cores = os.cpu_count() or 1
        return {
            "machine_busy_pct": round(100.0 * busy_s / (dt * cores), 1),
            "pool_cpu_pct": round(100.0 * tree / CLK_TCK / (dt * cores), 1),
            "wrk_cpu_pct": round(100.0 * wrk_cpu_s / (dt * cores), 1),
            "foreign_cpu_pct": round(max(0.0, 100.0 * foreign / (dt * cores)), 1),
        }


class Sampler:
    """Counts the supervisor's children every `every` seconds."""

    def __init__(self, pid, every=0.02):
        self.pid, self.every = pid, every
        self.samples = []
        self.stop = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        nxt = time.monotonic()
        while not self.stop:
            self.samples.append((time.monotonic(), len(children(self.pid))))
            nxt += self.every
            time.sleep(max(0.0, nxt - time.monotonic()))

    def close(self):
        self.stop = True
        self.thread.join()
        return self.samples


# ------------------------------------------------------------------ scenarios


def footprint(pid):
    desc = descendants(pid)
    return {
        "workers": len(children(pid)),
        "sup_rss_kb": status_kb(pid, "VmRSS"),
        "total_rss_kb": status_kb(pid, "VmRSS") + sum(status_kb(p, "VmRSS") for p in desc),
        "sup_pss_kb": pss_kb(pid),
        "total_pss_kb": pss_kb(pid) + sum(pss_kb(p) for p in desc),
    }


def scenario_idle(srv, secs):
    """Idle footprint: CPU of the supervisor (and of the whole pool) over
    `secs` with no requests, memory at the end."""
    pids = [srv.pid] + descendants(srv.pid)
    t0 = time.monotonic()
    m0 = machine_ticks()
    before = {p: cpu_ticks(p) for p in pids}
    time.sleep(secs)
    dt = time.monotonic() - t0
    m1 = machine_ticks()
    after = {p: cpu_ticks(p) for p in pids}
    sup = (after[srv.pid] - before[srv.pid]) / CLK_TCK
    total = sum(after[p] - before[p] for p in pids if before[p] is not None and after[p] is not None) / CLK_TCK
    r = footprint(srv.pid)
    r.update(
        secs=dt,
        sup_cpu_pct=100.0 * sup / dt,
        total_cpu_pct=100.0 * total / dt,
        # Whole-machine busy share meanwhile (of all cores): anything well
        # above the pool's own use is other load that disturbs the run.
        machine_busy_pct=100.0 * (m1[0] - m0[0]) / max(1, m1[1] - m0[1]),
    )
    return r


def read_wrk_logs(logdir):
    rows = []
    for name in sorted(os.listdir(logdir)):
        if name.startswith("wrk-thread-"):
            with open(os.path.join(logdir, name)) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) == 3 and parts[0] != "-":
                        rows.append((int(parts[0]) / 1e6, int(parts[1]) / 1e3, int(parts[2])))
    rows.sort()
    return rows


def scenario_burst(srv, secs, conns, path):
    """The pool has been idle; now `conns` connections of `path` for `secs`."""
    logdir = os.path.join(srv.workdir, "burst")
    os.makedirs(logdir, exist_ok=True)
    sampler = Sampler(srv.pid)
    n_events0 = len(srv.notify.events) if srv.notify else 0
    time.sleep(0.5)  # a baseline before the burst
    t0 = time.monotonic()
    fg = Foreign(srv.pid)
    out = wrk(srv.url, path, conns, secs, script=os.path.join(BENCH, "burst.lua"), logdir=logdir)
    load = fg.end(wrk.cpu_s)
    t_end = time.monotonic()
    time.sleep(1.0)  # and a bit after
    samples = sampler.close()
    with open(os.path.join(logdir, "wrk.out"), "w") as f:
        f.write(out)
    r = parse_wrk(out)
    r["load"] = load
    reqs = read_wrk_logs(logdir)
    start = reqs[0][0] if reqs else t0  # the first request's send time
    r["t0_lag_ms"] = (start - t0) * 1e3
    hi = srv.c.max
    reached = next((t for t, n in samples if t >= start and n >= hi), None)
    r["time_to_max_ms"] = None if reached is None else max(0.0, (reached - start) * 1e3)
    r["peak_workers"] = max((n for t, n in samples if start <= t <= t_end), default=0)
    ready = None
    if srv.notify:
        ev = srv.notify.events[n_events0:]
        ready_t = next((t for t, n, _ in ev if t >= start and n >= hi), None)
        ready = None if ready_t is None else (ready_t - start) * 1e3
        r["notify"] = [(round(t - start, 4), n, q) for t, n, q in ev]
    r["time_to_max_ready_ms"] = ready
    r["workers"] = [(round(t - start, 4), n) for t, n in samples]
    r["requests_log"] = [(round(t - start, 4), round(lat, 2), st) for t, lat, st in reqs]
    lats = sorted(lat for _, lat, _ in reqs)
    if lats:
        r["log_p50_ms"] = lats[len(lats) // 2]
        r["log_p99_ms"] = lats[min(len(lats) - 1, int(len(lats) * 0.99))]
        r["log_max_ms"] = lats[-1]
    return r


def scenario_steady(srv, loads, warm, secs):
    """Overhead: each load runs `warm` s unmeasured (the pool settles), then
    `secs` s measured."""
    out = {}
    for name, path, conns in loads:
        wrk(srv.url, path, conns, warm, latency=False)
        fg = Foreign(srv.pid)
        text = wrk(srv.url, path, conns, secs)
        load = fg.end(wrk.cpu_s)
        with open(os.path.join(srv.workdir, f"steady-{name}.out"), "w") as f:
            f.write(text)
        r = parse_wrk(text)
        r["load"] = load
        r["workers_after"] = len(children(srv.pid))
        out[name] = r
    return out


# ------------------------------------------------------------------ run


def wait_quiet(max_wait, threshold=15.0):
    """Wait (up to max_wait s) for the machine to be mostly idle; return the
    busy share (% of all cores) seen last."""
    deadline = time.monotonic() + max_wait
    while True:
        a = machine_ticks()
        time.sleep(2)
        b = machine_ticks()
        busy = 100.0 * (b[0] - a[0]) / max(1, b[1] - a[1])
        if busy < threshold or time.monotonic() > deadline:
            return busy
        log(f"machine {busy:.0f}% busy (other load); waiting for it to calm down")


def run_one(ctx, c, rep, args):
    res = {"contender": c.name, "repeat": rep}
    base = os.path.join(ctx.raw, f"{c.name}-r{rep}")
    if "idle" in c.scenarios or "burst" in c.scenarios:
        res["busy_before"] = wait_quiet(args.quiet_wait)
        srv = Server(ctx, c, base + "-burst")
        try:
            srv.wait_ready()
            if "idle" in c.scenarios:
                log(f"{c.name} r{rep}: idle {args.idle}s")
                res["idle"] = scenario_idle(srv, args.idle)
            elif "burst" in c.scenarios:
                time.sleep(args.burst_idle)
            if "burst" in c.scenarios:
                log(f"{c.name} r{rep}: burst {args.burst}s")
                res["burst"] = scenario_burst(srv, args.burst, args.burst_conns, args.burst_path)
                b = res["burst"]
                log(f"  {b.get('rps')} req/s p99 {b.get('p99_ms')} ms max {b.get('lat_max_ms')} ms "
                    f"errors {b['errors']} to-max {b['time_to_max_ms']} ms; load {b['load']}")
        finally:
            srv.stop()
        if c.kind == "drove" and res.get("burst"):
            with open(os.path.join(srv.workdir, "server.log")) as f:
                res["burst"]["scale_log"] = [l.rstrip() for l in f if 'event="scale' in l]
    if "steady" in c.scenarios:
        wait_quiet(args.quiet_wait)
        srv = Server(ctx, c, base + "-steady")
        try:
            srv.wait_ready()
            log(f"{c.name} r{rep}: steady")
            res["steady"] = scenario_steady(srv, ctx.loads, args.warm, args.steady)
            log("  " + ", ".join(f"{k} {v.get('rps')} req/s ({v['workers_after']} workers, "
                                 f"other load {v['load']['foreign_cpu_pct']}%)"
                                 for k, v in res["steady"].items()))
        finally:
            srv.stop()
    return res


def versions(ctx):
    def out(argv):
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=20).stdout.strip() or \
                subprocess.run(argv, capture_output=True, text=True, timeout=20).stderr.strip()
        except OSError as e:
            return str(e)
    rev = out(["git", "-C", ROOT, "describe", "--always", "--dirty"])
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "drove": rev,
        "droved": out([ctx.droved, "--version"]),
        "gunicorn": out([os.path.join(ctx.venv, "bin", "gunicorn"), "--version"]),
        "uwsgi": out([os.path.join(ctx.venv, "bin", "uwsgi"), "--version"]),
        "python": platform.python_version(),
        "wrk": out(["wrk", "-v"]).splitlines()[0] if out(["wrk", "-v"]) else "",
        "kernel": platform.release(),
        "cpu": cpu,
        "cores": os.cpu_count(),
    }


def servers_defaults(ap, args):
    """--servers: 2 repeats of 30 s idle, 10 s burst, 60 s steady by
    default; --quick: the heavy app only, short phases, 20 kills."""
    default_out = os.path.join(BENCH, "results")
    if ap.get_default("repeats") == args.repeats:
        args.repeats = 2
    if args.quick:
        args.repeats = 2
        args.apps, args.idle, args.burst, args.warm = "heavy", 5.0, 5, 1
        args.steady_hello, args.steady_work, args.kills = 4, 8, 20
        args.quiet_wait = min(args.quiet_wait, 5.0)
    if args.out == default_out:
        args.out = os.path.join(default_out, "servers-quick" if args.quick else "servers")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="short smoke run: 1 repeat, short phases")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", help="comma-separated contender names")
    ap.add_argument("--idle", type=float, default=30.0, help="idle-footprint phase, s")
    ap.add_argument("--burst", type=int, default=10, help="burst duration, s")
    ap.add_argument("--burst-idle", type=float, default=5.0, help="idle before a burst when there is no idle phase")
    ap.add_argument("--burst-conns", type=int, default=64)
    ap.add_argument("--burst-path", default="/sleep?ms=20")
    ap.add_argument("--steady", type=int, default=10, help="measured part of each steady load, s")
    ap.add_argument("--warm", type=int, default=3, help="unmeasured warm-up of each steady load, s")
    ap.add_argument("--quiet-wait", type=float, default=30.0,
                    help="wait up to this long for other load on the machine to stop before each phase")
    ap.add_argument("--out", default=os.path.join(BENCH, "results"))
    ap.add_argument("--droved", required=True)
    ap.add_argument("--rust-worker", required=True)
    ap.add_argument("--venv", required=True)
    ap.add_argument("--report-only", action="store_true", help="redo table and plot from OUT/results.json")
    sv = ap.add_argument_group("--servers: issue 23, template mode against the real servers (servers.py)")
    sv.add_argument("--servers", action="store_true",
                    help="run servers.py's contenders instead (results in OUT/servers/)")
    sv.add_argument("--apps", default="heavy,light", help="heavy, light or both")
    sv.add_argument("--parts", default="fork,pools,replace", help="fork, pools, replace")
    sv.add_argument("--kills", type=int, default=100, help="worker replacements per mode")
    sv.add_argument("--steady-hello", type=int, default=20, help="measured s of steady `/`")
    sv.add_argument("--steady-work", type=int, default=40, help="measured s of steady `/work`")
    sv.add_argument("--start-timeout", type=float, default=180.0)
    args = ap.parse_args()
    if args.servers:
        servers_defaults(ap, args)
    if args.quick and not args.servers:
        args.repeats, args.idle, args.burst, args.steady, args.warm = 1, 5.0, 5, 3, 1
        args.quiet_wait = min(args.quiet_wait, 10.0)
        if args.out == os.path.join(BENCH, "results"):
            args.out = os.path.join(BENCH, "results", "quick.raw")

    class Ctx:
        pass

    ctx = Ctx()
    ctx.droved, ctx.rust_worker, ctx.venv = args.droved, args.rust_worker, args.venv
    ctx.python = os.path.join(args.venv, "bin", "python")
    ctx.loads = [("hello", "/", 32), ("sleep20", "/sleep?ms=20", 32)]
    if args.servers:
        import servers  # noqa: E402 (bench/servers.py)

        return servers.main(args, ctx)
    os.makedirs(args.out, exist_ok=True)
    results_path = os.path.join(args.out, "results.json")

    import report  # noqa: E402 (bench/report.py, needs matplotlib from the venv)

    if args.report_only:
        with open(results_path) as f:
            data = json.load(f)
        report.write(data, args.out)
        return

    ctx.raw = os.path.join(args.out, "run.raw")
    shutil.rmtree(ctx.raw, ignore_errors=True)
    os.makedirs(ctx.raw)
    cs = contenders()
    if args.only:
        names = args.only.split(",")
        unknown = set(names) - {c.name for c in cs}
        if unknown:
            sys.exit(f"unknown contenders {sorted(unknown)}; known: {[c.name for c in cs]}")
        cs = [c for c in cs if c.name in names]
    data = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "versions": versions(ctx),
        "params": {k: v for k, v in vars(args).items() if k not in ("droved", "rust_worker", "venv", "out")},
        "loads": ctx.loads,
        "contenders": [
            {"name": c.name, "label": c.label, "kind": c.kind, "worker": c.worker, "min": c.min,
             "max": c.max, "scenarios": list(c.scenarios), "color": c.color, "style": c.style}
            for c in cs
        ],
        "runs": [],
    }
    t_start = time.monotonic()
    for rep in range(1, args.repeats + 1):
        # Rotate the order each repeat, so slow drift in the machine's
        # background load does not always hit the same contender.
        k = (rep - 1) % len(cs)
        for c in cs[k:] + cs[:k]:
            try:
                data["runs"].append(run_one(ctx, c, rep, args))
            except Exception as e:  # one broken contender must not lose the rest
                log(f"{c.name} r{rep}: FAILED: {e}")
                data["runs"].append({"contender": c.name, "repeat": rep, "failed": str(e)})
            with open(results_path, "w") as f:
                json.dump(data, f)
    data["duration_s"] = round(time.monotonic() - t_start)
    with open(results_path, "w") as f:
        json.dump(data, f)
    log(f"done in {data['duration_s']} s")
    report.write(data, args.out)


if __name__ == "__main__":
    sys.path.insert(0, BENCH)
    main()
