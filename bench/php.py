# Used by bench/php, which builds droved and finds the tools; run that, not this.
# SPDX-License-Identifier: MIT OR Apache-2.0
"""PHP: drove + php-cgi against PHP-FPM, behind nginx (issue 17).

wrk -> nginx -> unix socket -> {php-fpm static 16, dynamic 2..16, ondemand
16; droved 2..16 and static 16 with php-cgi on fd 0}. Every contender runs
the same PHP script (bench/php-app/bench.php: usleep(20000), then its pid).
One run: idle footprint after 30 s idle, then a 64-connection burst, then
steady load. See bench/README.md ("PHP") for how to read the results.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)

import bench as B  # noqa: E402  (the /proc, wrk and sampling helpers)

ROOT = B.ROOT
DOCROOT = os.path.join(BENCH, "php-app")
PATH = "/bench.php"
FPM = "php-fpm8.2"

CONTENDERS = [
    # name, label, kind, min, max, color, style
    ("fpm-static", "php-fpm pm=static 16", "fpm", 16, 16, "tab:gray", "-"),
    ("fpm-dynamic", "php-fpm pm=dynamic 2..16 (spare 1..3)", "fpm", 2, 16, "tab:orange", "-"),
    ("fpm-ondemand", "php-fpm pm=ondemand max 16", "fpm", 0, 16, "tab:purple", "-"),
    ("drove-dyn", "drove 2..16, php-cgi", "drove", 2, 16, "tab:blue", "-"),
    ("drove-16", "drove static 16, php-cgi", "drove", 16, 16, "tab:cyan", "--"),
    # pool.min = 0: like ondemand, no worker at idle (only droved).
    ("drove-zero", "drove 0..16 (min = 0), php-cgi", "drove", 0, 16, "tab:green", "-."),
    # pool.spare = 2 (issue 26.4): idle workers kept beside the busy ones,
    # PHP-FPM's pm.min_spare_servers; min 1, so 2 idle at rest.
    ("drove-spare", "drove 1..16 spare 2, php-cgi", "drove", 1, 16, "tab:red", ":"),
]


class C:
    def __init__(self, name, label, kind, lo, hi, color, style):
        self.name, self.label, self.kind = name, label, kind
        self.min, self.max, self.color, self.style = lo, hi, color, style


def fpm_conf(c, workdir, sock):
    pm = {
        "fpm-static": "pm = static\n",
        "fpm-dynamic": "pm = dynamic\npm.start_servers = 2\npm.min_spare_servers = 1\npm.max_spare_servers = 3\n",
        "fpm-ondemand": "pm = ondemand\n",
    }[c.name]
    return (
        f"[global]\npid = {workdir}/fpm.pid\nerror_log = {workdir}/fpm.log\ndaemonize = no\n"
        f"[bench]\nlisten = {sock}\nlisten.backlog = {B.BACKLOG}\n"
        f"pm.max_children = {c.max}\n{pm}"
        "catch_workers_output = yes\n"
    )


def drove_conf(c, sock):
    # examples/php.toml without the deployment lines, with the bench's pool.
    return (
        f'[listen]\naddresses = "unix:{sock}"\nbacklog = {B.BACKLOG}\n'
        '[worker]\ncommand = ["php-cgi"]\nsocket = "stdin"\nready = "exec"\n'
        'environment = { PHP_FCGI_CHILDREN = "0", PHP_FCGI_MAX_REQUESTS = "0" }\n'
        "allow_root = true\n"
        f"[pool]\nmin = {c.min}\nmax = {c.max}\n"
        + ("spare = 2\n" if c.name == "drove-spare" else "")
    )


def nginx_conf(workdir, port, sock):
    # docs/guide/php.md's server block; one nginx process, the same for everyone.
    return f"""daemon off;
master_process off;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
worker_rlimit_nofile 4096;
events {{ worker_connections 2048; }}
http {{
  access_log off;
  default_type text/plain;
  client_body_temp_path {workdir}/body;
  fastcgi_temp_path {workdir}/fastcgi;
  proxy_temp_path {workdir}/proxy;
  scgi_temp_path {workdir}/scgi;
  uwsgi_temp_path {workdir}/uwsgi;
  server {{
    listen 127.0.0.1:{port};
    root {DOCROOT};
    location ~ \\.php$ {{
      include /etc/nginx/fastcgi_params;
      fastcgi_param SCRIPT_FILENAME $document_root$fastcgi_script_name;
      fastcgi_pass unix:{sock};
    }}
  }}
}}
"""


class Pool:
    """A contender (its supervisor: php-fpm's master or droved) and the
    nginx in front of it."""

    def __init__(self, ctx, c, workdir):
        self.c, self.workdir = c, workdir
        os.makedirs(workdir, exist_ok=True)
        sock = os.path.join(workdir, "php.sock")
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        self.notify = None
        if c.kind == "drove":
            path = os.path.join(workdir, "drove.toml")
            with open(path, "w") as f:
                f.write(drove_conf(c, sock))
            npath = os.path.join(workdir, "notify.sock")
            self.notify = B.NotifyReceiver(npath)
            env["NOTIFY_SOCKET"] = npath
            argv = [ctx.droved, "-c", path]
        else:
            path = os.path.join(workdir, "php-fpm.conf")
            with open(path, "w") as f:
                f.write(fpm_conf(c, workdir, sock))
            # -R: the pool runs as root like the php-cgi workers do here.
            argv = [FPM, "-F", "-R", "-y", path]
        self.err = open(os.path.join(workdir, "server.log"), "w")
        self.proc = subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self.err, stderr=self.err, start_new_session=True)
        self.pid = self.proc.pid
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{c.name}: no socket; see {workdir}/server.log")
            time.sleep(0.02)
        self.port = B.free_port()
        npath = os.path.join(workdir, "nginx.conf")
        with open(npath, "w") as f:
            f.write(nginx_conf(workdir, self.port, sock))
        self.nginx_log = open(os.path.join(workdir, "nginx.log"), "w")
        self.nginx = subprocess.Popen(["nginx", "-p", workdir, "-c", npath, "-e",
                                       os.path.join(workdir, "nginx-error.log")],
                                      stdin=subprocess.DEVNULL, stdout=self.nginx_log,
                                      stderr=self.nginx_log, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def get(self, path):
        import socket
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                s.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
                head = s.recv(64)
                return head.startswith(b"HTTP/1.") and head.split(b" ")[1] == b"200"
        except OSError:
            return False

    def wait_ready(self, timeout=30.0):
        want = self.c.min
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in (self.proc, self.nginx):
                if p.poll() is not None:
                    raise RuntimeError(f"{self.c.name}: a process exited; see {self.workdir}")
            if len(B.children(self.pid)) >= want and self.get(PATH):
                time.sleep(1.0)
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.c.name} not ready after {timeout} s; see {self.workdir}")

    def stop(self):
        for p in (self.nginx, self.proc):
            if p.poll() is None:
                p.send_signal(signal.SIGQUIT if p is self.nginx else signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.err.close()
        self.nginx_log.close()
        if self.notify:
            self.notify.close()


def tree_pss(pid):
    """PSS (kB) of the supervisor and every process under it."""
    return B.pss_kb(pid) + sum(B.pss_kb(p) for p in B.descendants(pid))


def run_one(ctx, c, args):
    res = {"contender": c.name}
    pool = Pool(ctx, c, os.path.join(ctx.raw, c.name))
    try:
        pool.wait_ready()
        res["busy_before"] = B.wait_quiet(args.quiet_wait)
        B.log(f"{c.name}: idle {args.idle}s")
        idle = B.scenario_idle(pool, args.idle)
        idle["per_worker_pss_kb"] = [B.pss_kb(p) for p in B.children(pool.pid)]
        res["idle"] = idle
        B.log(f"  {idle['workers']} workers, PSS {idle['total_pss_kb'] / 1024:.1f} MB "
              f"(supervisor {idle['sup_pss_kb'] / 1024:.1f} MB)")
        B.log(f"{c.name}: burst {args.burst}s c{args.conns}")
        b = B.scenario_burst(pool, args.burst, args.conns, PATH)
        res["burst"] = b
        B.log(f"  {b.get('rps')} req/s p50 {b.get('p50_ms')} p99 {b.get('p99_ms')} ms "
              f"max {b.get('lat_max_ms')} ms errors {b['errors']} to-16 {b['time_to_max_ms']} ms "
              f"peak {b['peak_workers']}; load {b['load']}")
        B.log(f"{c.name}: steady {args.warm}+{args.steady}s c{args.steady_conns}")
        res["steady"] = B.scenario_steady(pool, [("sleep20", PATH, args.steady_conns)],
                                          args.warm, args.steady)["sleep20"]
        s = res["steady"]
        B.log(f"  {s.get('rps')} req/s p99 {s.get('p99_ms')} ms, {s['workers_after']} workers")
    finally:
        pool.stop()
    if c.kind == "drove":
        with open(os.path.join(pool.workdir, "server.log")) as f:
            res["scale_log"] = [line.rstrip() for line in f if 'event="scale' in line]
    return res


def php_cgi_startup(samples=20):
    """How long one php-cgi takes from exec to its first answer on fd 0
    (what a scale-up waits for per worker): median and max of `samples`
    runs, each on its own socket, one at a time."""
    import socket
    import tempfile
    out = []
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, PHP_FCGI_CHILDREN="0", PHP_FCGI_MAX_REQUESTS="0",
                   SCRIPT_FILENAME=os.path.join(DOCROOT, "bench.php"), REQUEST_METHOD="GET",
                   QUERY_STRING="ms=0")
        for i in range(samples):
            path = os.path.join(d, f"s{i}")
            ls = socket.socket(socket.AF_UNIX)
            ls.bind(path)
            ls.listen(16)
            t0 = time.monotonic()
            p = subprocess.Popen(["php-cgi"], stdin=ls.fileno(), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, env=env)
            r = subprocess.run(["cgi-fcgi", "-bind", "-connect", path], env=env,
                               capture_output=True, timeout=20)
            out.append((time.monotonic() - t0) * 1e3)
            assert b"pid=" in r.stdout, r.stdout
            p.terminate()
            p.wait()
            ls.close()
    out.sort()
    return {"median_ms": out[len(out) // 2], "max_ms": out[-1], "samples": len(out)}


def versions(ctx):
    def out(argv):
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=20)
            return (r.stdout.strip() or r.stderr.strip()).splitlines()[0]
        except (OSError, IndexError) as e:
            return str(e)
    return {
        "drove": out(["git", "-C", ROOT, "describe", "--always", "--dirty"]),
        "droved": out([ctx.droved, "--version"]),
        "php-cgi": out(["php-cgi", "-v"]),
        "php-fpm": out([FPM, "-v"]),
        "nginx": out(["nginx", "-v"]),
        "wrk": out(["wrk", "-v"]),
        "kernel": os.uname().release,
        "cores": os.cpu_count(),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--droved", required=True)
    ap.add_argument("--out", default=os.path.join(BENCH, "results"))
    ap.add_argument("--only", default="")
    ap.add_argument("--idle", type=float, default=30.0, help="idle seconds before the burst")
    ap.add_argument("--burst", type=int, default=10)
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--warm", type=int, default=3)
    ap.add_argument("--steady", type=int, default=10)
    ap.add_argument("--steady-conns", type=int, default=32)
    ap.add_argument("--quiet-wait", type=float, default=60.0)
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    import php_report
    results = os.path.join(args.out, "php.json")
    if args.report_only:
        with open(results) as f:
            php_report.write(json.load(f), args.out)
        return

    class Ctx:
        pass
    ctx = Ctx()
    ctx.droved = os.path.abspath(args.droved)
    ctx.raw = os.path.join(args.out, "php.raw")
    shutil.rmtree(ctx.raw, ignore_errors=True)
    os.makedirs(ctx.raw)
    cs = [C(*t) for t in CONTENDERS]
    if args.only:
        cs = [c for c in cs if c.name in args.only.split(",")]
    data = {
        "versions": versions(ctx),
        "params": vars(args),
        "contenders": [{"name": c.name, "label": c.label, "kind": c.kind, "min": c.min,
                        "max": c.max, "color": c.color, "style": c.style} for c in cs],
        "runs": [],
    }
    B.log("php-cgi start-up (exec to first answer)")
    data["php_cgi_startup"] = php_cgi_startup()
    B.log(f"  {data['php_cgi_startup']}")
    t0 = time.monotonic()
    for c in cs:
        try:
            data["runs"].append(run_one(ctx, c, args))
        except Exception as e:  # one broken contender must not lose the rest
            B.log(f"{c.name}: FAILED: {e}")
            data["runs"].append({"contender": c.name, "failed": str(e)})
        with open(results, "w") as f:
            json.dump(data, f)
    data["duration_s"] = round(time.monotonic() - t0)
    with open(results, "w") as f:
        json.dump(data, f)
    php_report.write(data, args.out)


if __name__ == "__main__":
    main()
