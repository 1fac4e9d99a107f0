# Used by bench/servers.py (and `bench/run --servers --report-only`); not run by hand.
# SPDX-License-Identifier: MIT OR Apache-2.0
"""servers.md (medians, ratios against the peers of the same run, issue
23's targets) and servers.png (the bursts) from servers.json."""

import os

from report import fmt, fmt_ms, med, ratio

# Issue 23's targets.
T_BURST_P99 = 1.1  # dynamic 2..16 / the same server static 16
T_READY_MS = 100.0  # 16 workers ready after the burst's first request
T_PSS_GUNICORN = 0.9  # drove template static 16 / gunicorn --preload, same worker class
T_PSS_PUMA = 1.0  # drove template + Puma static 16 / Puma cluster preload
T_THROUGHPUT = 0.97  # drove template static 16 / gunicorn --preload, same worker class
T_REPLACE_MS = 10.0  # kill -> READY=1, heavy app, template mode

# (group, preload peer, no-preload peer, drove static, drove dynamic, drove exec)
GROUPS = [
    ("gunicorn sync", "gunicorn-preload-16-sync", "gunicorn-16-sync", "drove-tpl-16-sync",
     "drove-tpl-dyn-sync", "drove-exec-16-sync"),
    ("gunicorn + uvicorn worker", "gunicorn-preload-16-uv", "gunicorn-16-uv", "drove-tpl-16-uv",
     "drove-tpl-dyn-uv", None),
    ("Puma", "puma-preload-16", None, "drove-puma-16", "drove-puma-dyn", None),
]


def collect(data, app):
    """name -> metric -> list over repeats, for one app."""
    out = {}
    for run in data["runs"]:
        if run.get("app") != app:
            continue
        m = out.setdefault(run["contender"], {})
        if "failed" in run:
            m.setdefault("failed", []).append(run["failed"])
            continue
        b, s, a = run["burst"], run["steady"], run["after_steady"]
        vals = {
            "start_s": run.get("start_to_settled_s"),
            "idle_pss": run["idle"]["total_pss_kb"] / 1024,
            "burst_rps": b.get("rps"), "p50": b.get("p50_ms"), "p99": b.get("p99_ms"),
            "p99_raw": b.get("log_p99_ms"), "max": b.get("lat_max_ms"), "errors": b.get("errors"),
            "to16": b.get("time_to_max_ms"), "ready16": b.get("time_to_max_ready_ms"),
            "hello_rps": s["hello"].get("rps"), "work_rps": s["work"].get("rps"),
            "pss": a["total_pss_kb"] / 1024, "pool_pss": a["pool_pss_kb"] / 1024,
            "procs": a["workers"], "load1": run["loadavg_before"][0],
            "load1_after": run["loadavg_after"][0],
            "foreign": max((b.get("load") or {}).get("foreign_cpu_pct") or 0,
                           (s["hello"].get("load") or {}).get("foreign_cpu_pct") or 0,
                           (s["work"].get("load") or {}).get("foreign_cpu_pct") or 0),
        }
        for k, v in vals.items():
            m.setdefault(k, []).append(v)
    return out


def each(xs, f):
    return ", ".join(f(x) for x in xs)


def medians_table(data, agg):
    lines = [
        "| contender | start → settled | idle PSS | burst req/s | p50 | p99 | p99 raw | max | errors "
        "| 16 procs after | 16 ready after | steady req/s `/` | steady req/s `/work` "
        "| PSS after steady (total / w/o droved) | load avg 1 min |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in data["contenders"]:
        m = agg.get(c["name"])
        if not m:
            continue
        if "failed" in m and "p99" not in m:
            lines.append(f"| {c['label']} (`{c['name']}`) | failed: {m['failed'][0][:80]} |" + " |" * 13)
            continue

        def g(k):
            return med(m.get(k, []))

        fixed = c["min"] == c["max"]
        lines.append(
            f"| {c['label']} (`{c['name']}`) | {fmt(g('start_s'), ' s', 1)} | {fmt(g('idle_pss'), ' MB')} "
            f"| {fmt(g('burst_rps'))} | {fmt_ms(g('p50'))} | {fmt_ms(g('p99'))} | {fmt_ms(g('p99_raw'))} "
            f"| {fmt_ms(g('max'))} | {fmt(g('errors'))} "
            f"| {'– (fixed)' if fixed else fmt_ms(g('to16'))} "
            f"| {'– (fixed)' if fixed or c['kind'] != 'drove' else fmt_ms(g('ready16'))} "
            f"| {fmt(g('hello_rps'))} | {fmt(g('work_rps'))} "
            f"| {fmt(g('pss'), ' MB')} / {fmt(g('pool_pss'), ' MB')} "
            f"| {each(m.get('load1', []), lambda x: f'{x:.1f}')} |"
        )
    return "\n".join(lines)


def repeats_table(data, agg):
    lines = ["| contender | burst p99 | 16 ready after | steady `/` req/s | steady `/work` req/s "
             "| PSS after steady | load avg before → after | other load (max of phases) |",
             "|---|---|---|---|---|---|---|---|"]
    for c in data["contenders"]:
        m = agg.get(c["name"])
        if not m or "p99" not in m:
            continue
        lines.append(
            f"| `{c['name']}` | {each(m['p99'], fmt_ms)} | {each(m['ready16'], fmt_ms)} "
            f"| {each(m['hello_rps'], fmt)} | {each(m['work_rps'], fmt)} "
            f"| {each(m['pss'], lambda x: fmt(x, ' MB'))} "
            f"| {', '.join(f'{a:.1f} → {b:.1f}' for a, b in zip(m['load1'], m['load1_after']))} "
            f"| {each(m['foreign'], lambda x: f'{x:.0f} %')} |")
    return "\n".join(lines)


def targets(agg, replace):
    def g(n, k):
        return med(agg.get(n, {}).get(k, []))

    rows = []

    def add(what, value, goal, ok, note=""):
        verdict = "–" if ok is None else ("met" if ok else "**missed**")
        rows.append(f"| {what} | {value} | {goal} | {verdict} | {note} |")

    for group, pre, _, static, dyn, _ in GROUPS:
        r = ratio(g(dyn, "p99"), g(static, "p99"))
        add(f"{group}: burst p99, drove 2..16 / drove static 16",
            f"{fmt_ms(g(dyn, 'p99'))} / {fmt_ms(g(static, 'p99'))} = {fmt(r, '×', 2)}",
            f"≤ {T_BURST_P99}×", None if r is None else r <= T_BURST_P99)
        r = ratio(g(dyn, "p99"), g(pre, "p99"))
        add(f"{group}: burst p99, drove 2..16 / {pre}",
            f"{fmt_ms(g(dyn, 'p99'))} / {fmt_ms(g(pre, 'p99'))} = {fmt(r, '×', 2)}",
            f"≤ {T_BURST_P99}×", None if r is None else r <= T_BURST_P99)
        t = g(dyn, "ready16")
        add(f"{group}: 16 workers ready after the burst's first request", fmt_ms(t),
            f"≤ {T_READY_MS:.0f} ms", None if t is None else t <= T_READY_MS,
            f"16 processes after {fmt_ms(g(dyn, 'to16'))}")
        goal = T_PSS_PUMA if group == "Puma" else T_PSS_GUNICORN
        r = ratio(g(static, "pss"), g(pre, "pss"))
        r_pool = ratio(g(static, "pool_pss"), g(pre, "pss"))
        add(f"{group}: PSS after steady load, drove static 16 / {pre}",
            f"{fmt(g(static, 'pss'), ' MB')} / {fmt(g(pre, 'pss'), ' MB')} = {fmt(r, '×', 2)}",
            f"≤ {goal}×", None if r is None else r <= goal,
            f"with droved's own PSS; without it {fmt(r_pool, '×', 2)}")
        for load in ("hello", "work"):
            r = ratio(g(static, f"{load}_rps"), g(pre, f"{load}_rps"))
            path = "/" if load == "hello" else "/work"
            add(f"{group}: steady req/s `{path}`, drove static 16 / {pre}",
                f"{fmt(g(static, f'{load}_rps'))} / {fmt(g(pre, f'{load}_rps'))} = {fmt(r, '', 3)}",
                f"≥ {T_THROUGHPUT}", None if r is None else r >= T_THROUGHPUT)
    if replace and "template" in replace:
        t = replace["template"]["median_ms"]
        add("worker replacement, heavy app, template: kill → READY=1 (median)",
            f"{t:.1f} ms (p99 {replace['template']['p99_ms']:.1f} ms; exec "
            f"{replace['exec']['median_ms']:.0f} ms)", f"≤ {T_REPLACE_MS:.0f} ms", t <= T_REPLACE_MS,
            f"{len(replace['template']['times_ms'])} kills per mode")
    return "\n".join(["| target | measured (medians) | goal | verdict | note |", "|---|---|---|---|---|"] + rows)


def median_run(data, app, name):
    runs = [r for r in data["runs"] if r["contender"] == name and r.get("app") == app and r.get("burst")]
    if not runs:
        return None
    runs.sort(key=lambda r: r["burst"].get("p99_ms") or 0)
    return runs[len(runs) // 2]


def plot(data, app, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(GROUPS), 1, figsize=(12, 3.6 * len(GROUPS)), sharex=True)
    cs = {c["name"]: c for c in data["contenders"]}
    for ax, (group, pre, nopre, static, dyn, ex) in zip(axes, GROUPS):
        ax2 = ax.twinx()
        for name in (pre, nopre, static, dyn, ex):
            run = name and median_run(data, app, name)
            if not run:
                continue
            c, b = cs[name], run["burst"]
            reqs = [(t, lat) for t, lat, _ in b["requests_log"] if t <= 1.5]
            ax.scatter([t for t, _ in reqs], [lat for _, lat in reqs], s=3, color=c["color"],
                       label=f"{c['label']} (p99 {fmt_ms(b.get('p99_ms'))})", alpha=0.6)
            if c["min"] != c["max"]:
                w = [(t, n) for t, n in b["workers"] if -0.2 <= t <= 1.5]
                ax2.step([t for t, _ in w], [n for _, n in w], where="post", color=c["color"],
                         linewidth=1.5, label=f"{c['name']} processes")
        ax.set_title(f"{group}, {app} app: the first 1.5 s of the burst (median run by p99)")
        ax.set_ylabel("latency (ms)")
        ax.set_yscale("log")
        ax2.set_ylabel("processes")
        ax2.set_ylim(0, 18)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper right", fontsize=7, markerscale=3)
        ax2.legend(loc="center right", fontsize=7)
    axes[-1].set_xlabel("s since the burst's first request")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write(data, out):
    v = data["versions"]
    p = data["params"]
    lines = [
        "# Template mode against the real servers (issue 23)", "",
        f"Run {data['started']} by `bench/run --servers{' --quick' if p.get('quick') else ''}` "
        f"({p['repeats']} repeat(s) per contender, medians; {data.get('duration_s', '?')} s). "
        f"drove `{v['drove']}`, {v['gunicorn']}, {v.get('puma', '')}, Python {v['python']}, "
        f"{v['wrk']}; {v['cores']} × {v['cpu']}, Linux {v['kernel']}.", "",
        f"Per contender, fresh: start → settled (pool up, its CPU quiet); {p['idle']:.0f} s idle (PSS "
        f"at the end); burst `wrk -t2 -c{p['burst_conns']} -d{p['burst']}s {p['burst_path']}`; "
        f"steady `wrk -t2 -c32` on `/` ({p['warm']} s warm-up + {p['steady_hello']} s) then on "
        f"`/work` ({p['warm']} + {p['steady_work']} s: reads 2,000 of the app's objects, one full "
        "gc.collect() per process), then the PSS of every process (total: supervisor + template or "
        "master + workers; `w/o droved`: without droved's own). Load average is the machine's "
        "(`/proc/loadavg`) before each contender: this 2-core machine is shared, compare ratios "
        "within one run, not absolute numbers.", "",
    ]
    if "fork" in data:
        f = data["fork"]
        lines += ["## Fork cost of the heavy template", "",
                  "`python3` that imported bench/heavy_app.py; median of 20 `fork()`s until the child "
                  "runs, and of 20 double forks (the adapter's: the worker is a grandchild) until the "
                  f"grandchild runs. Load average {f['loadavg'][0]:.1f}.", "",
                  "| template | import | RSS | fork | double fork |", "|---|---|---|---|---|"]
        for k, label in (("freeze", "gc.freeze() (the adapter's default)"), ("no_freeze", "no gc.freeze()")):
            x = f[k]
            lines.append(f"| {label} | {x['import_s']:.2f} s | {x['rss_mb']:.0f} MB | {x['fork_ms']:.2f} ms "
                         f"| {x['double_fork_ms']:.2f} ms |")
        lines.append("")
    r = data.get("replace")
    apps = sorted({run.get("app") for run in data["runs"]}, key=lambda a: a != "heavy")
    for app in apps:
        agg = collect(data, app)
        lines += [f"## {app} app", "", "### Medians", "", medians_table(data, agg), "",
                  "### Issue 23's targets", "", targets(agg, r if app == "heavy" else None), "",
                  "### Every repeat", "", repeats_table(data, agg), "",
                  f"![burst]({'servers' if app == 'heavy' else 'servers-' + app}.png)", ""]
        plot(data, app, os.path.join(out, "servers.png" if app == "heavy" else f"servers-{app}.png"))
    if r and "template" in r:
        lines += ["## Worker replacement, heavy app (bench/replace.py --app heavy)", "",
                  "| mode | kills | median | p99 |", "|---|---|---|---|"]
        for mode in ("exec", "template"):
            lines.append(f"| {mode} | {len(r[mode]['times_ms'])} | {r[mode]['median_ms']:.1f} ms "
                         f"| {r[mode]['p99_ms']:.1f} ms |")
        lines.append("")
    with open(os.path.join(out, "servers.md"), "w") as fh:
        fh.write("\n".join(lines))
