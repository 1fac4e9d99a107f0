# Used by bench/php.py; `bench/php --report-only` redoes the report from php.json.
# SPDX-License-Identifier: MIT OR Apache-2.0
"""bench/results/php.md (tables, issue 17's targets) and php.png (the burst)."""

import math
import os

DYN = "drove-dyn"


def run(data, name):
    return next((r for r in data["runs"] if r["contender"] == name and not r.get("failed")), None)


def get(data, name, *keys):
    r = run(data, name)
    for k in keys:
        if r is None:
            return None
        r = r.get(k)
    return r


def fmt(v, digits=0, unit=""):
    if v is None:
        return "–"
    return f"{v:,.{digits}f}{unit}"


def fmt_ms(v):
    if v is None:
        return "–"
    return f"{v / 1000:.2f} s" if v >= 1000 else f"{v:.0f} ms"


def table(data):
    rows = [
        "| contender | idle workers | idle PSS, whole tree | supervisor PSS | PSS per worker | burst req/s | p50 | p99 | max | errors | time to 16 procs | peak procs | steady req/s | steady p99 | steady procs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in data["contenders"]:
        r = run(data, c["name"])
        if r is None:
            rows.append(f"| {c['label']} | failed | | | | | | | | | | | | | |")
            continue
        i, b, s = r["idle"], r["burst"], r["steady"]
        per = i.get("per_worker_pss_kb") or []
        per_s = f"{sum(per) / len(per) / 1024:.1f} MB" if per else "–"
        if c["min"] == c["max"]:
            to16 = f"– (fixed {c['max']})"
        else:
            to16 = fmt_ms(b.get("time_to_max_ms")) if b.get("time_to_max_ms") is not None else "never"
        rows.append(
            f"| {c['label']} (`{c['name']}`) | {i['workers']} | {i['total_pss_kb'] / 1024:.1f} MB | "
            f"{i['sup_pss_kb'] / 1024:.1f} MB | {per_s} | {fmt(b.get('rps'))} | {fmt_ms(b.get('p50_ms'))} | "
            f"{fmt_ms(b.get('p99_ms'))} | {fmt_ms(b.get('lat_max_ms'))} | {b['errors']} | {to16} | "
            f"{b['peak_workers']} | {fmt(s.get('rps'))} | {fmt_ms(s.get('p99_ms'))} | {s['workers_after']} |"
        )
    return "\n".join(rows)


def targets(data):
    rows = ["| target | measured | goal | verdict |", "|---|---|---|---|"]

    def ratio(a, b):
        return None if a is None or b is None or b == 0 else a / b

    def row(what, v, goal, ok, fmt_v):
        verdict = "–" if v is None else ("met" if ok(v) else "**missed**")
        rows.append(f"| {what} | {fmt_v(v) if v is not None else '–'} | {goal} | {verdict} |")

    p99 = lambda n: get(data, n, "burst", "p99_ms")  # noqa: E731
    x = lambda v: f"{v:.2f}×"  # noqa: E731
    for other, goal in (("fpm-dynamic", 0.5), ("fpm-ondemand", 1.0), ("fpm-static", 1.3)):
        v = ratio(p99(DYN), p99(other))
        row(f"burst p99: drove 2..16 / {other} ({fmt_ms(p99(DYN))} / {fmt_ms(p99(other))})",
            v, f"≤ {goal}×", lambda v, g=goal: v <= g, x)
    for name in (DYN, "drove-16"):
        s, f = get(data, name, "steady", "rps"), get(data, "fpm-static", "steady", "rps")
        v = ratio(s, f)
        row(f"steady req/s: {name} / fpm-static ({fmt(s)} / {fmt(f)})", v, "≥ 0.95×",
            lambda v: v >= 0.95, x)
    b = get(data, "fpm-ondemand", "idle", "total_pss_kb")
    for name, label in ((DYN, "drove 2..16"), ("drove-zero", "drove 0..16")):
        a = get(data, name, "idle", "total_pss_kb")
        v = ratio(a, b)
        row(f"idle PSS: {label} / fpm-ondemand ({fmt(a and a / 1024, 1, ' MB')} / "
            f"{fmt(b and b / 1024, 1, ' MB')})", v, "≤ 1.0×", lambda v: v <= 1.0, x)
    # Like for like: both pools empty at idle, both start on demand.
    v = ratio(p99("drove-zero"), p99("fpm-ondemand"))
    row(f"burst p99: drove 0..16 / fpm-ondemand ({fmt_ms(p99('drove-zero'))} / "
        f"{fmt_ms(p99('fpm-ondemand'))})", v, "(like for like)", lambda v: v <= 1.0, x)
    return "\n".join(rows)


def plot(data, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(3, 2, figsize=(15, 11), sharex="col",
                             gridspec_kw={"width_ratios": [2.2, 1]})
    for c in data["contenders"]:
        r = run(data, c["name"])
        if r is None:
            continue
        b = r["burst"]
        col, st, lab = c["color"], c["style"], c["label"]
        for axes, bucket in (([row[0] for row in grid], 0.25), ([row[1] for row in grid], 0.05)):
            axes[0].step([t for t, _ in b["workers"]], [n for _, n in b["workers"]], where="post",
                         color=col, linestyle=st, linewidth=1.8, label=lab)
            groups, done = {}, {}
            for t, lat, _ in b["requests_log"]:
                groups.setdefault(math.floor(t / bucket), []).append(lat)
                k = math.floor((t + lat / 1000) / bucket)
                done[k] = done.get(k, 0) + 1
            ks = sorted(groups)
            p99 = []
            for k in ks:
                g = sorted(groups[k])
                p99.append(g[min(len(g) - 1, int(len(g) * 0.99))])
            axes[1].plot([(k + 0.5) * bucket for k in ks], p99, color=col, linestyle=st,
                         linewidth=1.5, marker="." if bucket < 0.1 else None, label=lab)
            ks = sorted(done)
            axes[2].plot([(k + 0.5) * bucket for k in ks], [done[k] / bucket for k in ks],
                         color=col, linestyle=st, linewidth=1.5, label=lab)
    axes = [row[0] for row in grid]
    p = data["params"]
    axes[0].set_title(f"PHP burst through nginx: wrk -t2 -c{p['conns']} (usleep 20 ms) for "
                      f"{p['burst']} s after {p['idle']:.0f} s idle")
    axes[0].set_ylabel("PHP processes (children of the supervisor)")
    axes[1].set_ylabel("p99 latency by send time (ms, log)")
    axes[1].set_yscale("log")
    axes[2].set_ylabel("completed req/s")
    axes[2].set_xlabel("seconds since the first request of the burst")
    axes[1].set_title("p99 latency of requests sent in each 250 ms", fontsize=10)
    axes[2].set_title("throughput, 250 ms buckets", fontsize=10)
    for row in grid:
        for ax in row:
            ax.grid(True, alpha=0.3)
            ax.axvline(0, color="black", linewidth=0.8)
    grid[0][0].set_ylim(0, 17.5)
    grid[0][1].set_ylim(0, 17.5)
    grid[1][1].set_yscale("log")
    grid[0][1].set_title("first second (50 ms buckets)")
    grid[2][1].set_xlabel("seconds (zoom)")
    axes[0].set_xlim(-0.5, p["burst"] + 1)
    grid[0][1].set_xlim(-0.05, 1.0)
    axes[0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write(data, out):
    v = data["versions"]
    st = data.get("php_cgi_startup") or {}
    text = f"""# PHP behind nginx: drove + php-cgi against PHP-FPM (bench/php)

One run, {v.get('cores')} cores, kernel {v.get('kernel')}; {v.get('php-cgi')}; {v.get('php-fpm')};
{v.get('nginx')}; {v.get('droved')} ({v.get('drove')}); {v.get('wrk')}.
wrk -> nginx (one process) -> unix socket -> the pool; the script sleeps
20 ms (usleep) and answers its pid. Idle: {data['params']['idle']:.0f} s with no
request, then PSS of the supervisor and every process under it. Burst:
`wrk -t2 -c{data['params']['conns']} -d{data['params']['burst']}s` straight after the idle phase. Steady:
`wrk -t2 -c{data['params']['steady_conns']}`, {data['params']['warm']} s unmeasured, then {data['params']['steady']} s measured, on the
same (now warm) pool. php-cgi start-up, exec to its first answer on fd 0:
median {fmt(st.get('median_ms'), 1)} ms, max {fmt(st.get('max_ms'), 1)} ms over {st.get('samples')} starts.

{table(data)}

## Issue 17's targets

{targets(data)}

![burst](php.png)
"""
    with open(os.path.join(out, "php.md"), "w") as f:
        f.write(text)
    plot(data, os.path.join(out, "php.png"))
