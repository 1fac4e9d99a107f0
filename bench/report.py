# Used by bench/bench.py (and `bench/run --report-only`); not run by hand.
# SPDX-License-Identifier: MIT OR Apache-2.0
"""Medians, ratios and targets as markdown (results.md), and the burst
plot (burst.png), from results.json."""

import math
import os
import statistics

REF_STATIC = "drove-16"  # the static max pool, same worker, same supervisor
DYN = "drove-dyn"

# Issue 4's targets.
T_OVERHEAD = 0.99
T_P99_VS_STATIC = 1.2
T_TO_MAX_MS = 250.0
T_IDLE_CPU_PCT = 0.2


def med(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return statistics.median(xs)


def collect(data):
    """name -> metric -> list over repeats."""
    out = {}
    for run in data["runs"]:
        m = out.setdefault(run["contender"], {})
        if "failed" in run:
            m.setdefault("failed", []).append(run["failed"])
            continue
        b = run.get("burst")
        if b:
            for k in ("rps", "p50_ms", "p99_ms", "log_p99_ms", "lat_max_ms", "errors", "peak_workers"):
                m.setdefault("burst_" + k, []).append(b.get(k))
            m.setdefault("burst_foreign", []).append((b.get("load") or {}).get("foreign_cpu_pct"))
            # Never reaching max counts as infinitely slow for the median.
            for k in ("time_to_max_ms", "time_to_max_ready_ms"):
                v = b.get(k)
                m.setdefault(k, []).append(math.inf if v is None else v)
        i = run.get("idle")
        if i:
            for k in ("sup_rss_kb", "total_rss_kb", "total_pss_kb", "sup_cpu_pct", "total_cpu_pct",
                      "workers", "machine_busy_pct"):
                m.setdefault("idle_" + k, []).append(i.get(k))
        for load, r in (run.get("steady") or {}).items():
            m.setdefault(f"steady_{load}_rps", []).append(r.get("rps"))
            m.setdefault(f"steady_{load}_errors", []).append(r.get("errors"))
            m.setdefault(f"steady_{load}_workers", []).append(r.get("workers_after"))
            m.setdefault(f"steady_{load}_foreign", []).append((r.get("load") or {}).get("foreign_cpu_pct"))
    return out


def fmt(v, unit="", digits=0):
    if v is None:
        return "–"
    if isinstance(v, float) and math.isinf(v):
        return "never"
    if digits == 0:
        return f"{v:,.0f}{unit}"
    return f"{v:,.{digits}f}{unit}"


def fmt_ms(v):
    if v is None:
        return "–"
    if math.isinf(v):
        return "never"
    return f"{v / 1000:.2f} s" if v >= 1000 else f"{v:.0f} ms"


def rng(xs, f):
    xs = [x for x in xs if x is not None]
    if len(xs) < 2:
        return ""
    return f" ({f(min(xs))}–{f(max(xs))})"


def ratio(a, b):
    if a is None or b is None or b == 0 or math.isinf(a) or math.isinf(b):
        return None
    return a / b


def table(data, agg):
    names = [c["name"] for c in data["contenders"]]
    labels = {c["name"]: c["label"] for c in data["contenders"]}
    cons = {c["name"]: c for c in data["contenders"]}
    loads = [l[0] for l in data["loads"]]
    lines = []
    head = ["contender"]
    head += [f"steady req/s `{p}` c{n}" for _, p, n in data["loads"]]
    head += ["burst req/s", "p50", "p99", "p99 raw", "max", "errors", "time to 16 procs",
             "supervisor RSS", "total RSS / PSS", "idle CPU supervisor", "idle workers"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for n in names:
        a = agg.get(n, {})
        if a.get("failed") and len(a) == 1:
            lines.append(f"| {labels[n]} | failed: {a['failed'][0]} |")
            continue

        def g(k):
            return med(a.get(k, []))

        row = [f"{labels[n]} (`{n}`)"]
        row += [fmt(g(f"steady_{l}_rps")) for l in loads]
        c = cons[n]
        if c["min"] == c["max"]:
            tmax_s = f"– (fixed {c['max']})"
        elif n.startswith("drove") and a.get("time_to_max_ready_ms"):
            tmax_s = f"{fmt_ms(g('time_to_max_ms'))} (ready {fmt_ms(g('time_to_max_ready_ms'))})"
        else:
            tmax_s = fmt_ms(g("time_to_max_ms"))
        row += [
            fmt(g("burst_rps")),
            fmt_ms(g("burst_p50_ms")) if "burst_p50_ms" in a else "–",
            fmt_ms(g("burst_p99_ms")) if "burst_p99_ms" in a else "–",
            fmt_ms(g("burst_log_p99_ms")) if "burst_log_p99_ms" in a else "–",
            fmt_ms(g("burst_lat_max_ms")) if "burst_lat_max_ms" in a else "–",
            fmt(g("burst_errors")),
            tmax_s if "burst_rps" in a else "–",
            fmt(g("idle_sup_rss_kb") / 1024, " MB", 1) if g("idle_sup_rss_kb") else "–",
            (f"{g('idle_total_rss_kb') / 1024:.0f} / {g('idle_total_pss_kb') / 1024:.0f} MB"
             if g("idle_total_rss_kb") else "–"),
            fmt(g("idle_sup_cpu_pct"), " %", 3) if g("idle_sup_cpu_pct") is not None else "–",
            fmt(g("idle_workers")),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def spread(data, agg):
    names = [c["name"] for c in data["contenders"]]
    labels = {c["name"]: c["label"] for c in data["contenders"]}
    loads = [l[0] for l in data["loads"]]
    lines = ["| contender | " + " | ".join(f"steady `{l}` req/s" for l in loads)
             + " | burst p99 | time to 16 procs | idle CPU supervisor | steady workers at end"
             + " | other load: burst / steady |",
             "|" + "---|" * (len(loads) + 6)]
    for n in names:
        a = agg.get(n, {})

        def each(k, f):
            xs = a.get(k) or []
            return ", ".join(f(x) if x is not None else "–" for x in xs) or "–"

        lines.append(
            f"| `{n}` | "
            + " | ".join(each(f"steady_{l}_rps", lambda x: f"{x:.0f}") for l in loads)
            + f" | {each('burst_p99_ms', fmt_ms)} | {each('time_to_max_ms', fmt_ms)}"
            + f" | {each('idle_sup_cpu_pct', lambda x: f'{x:.3f} %')}"
            + f" | {' / '.join(each(f'steady_{l}_workers', lambda x: str(x)) for l in loads)}"
            + f" | {each('burst_foreign', lambda x: f'{x:.0f}%')} / "
            + " / ".join(each(f"steady_{l}_foreign", lambda x: f"{x:.0f}%") for l in loads) + " |"
        )
    return "\n".join(lines)


def targets(data, agg):
    def g(n, k):
        return med(agg.get(n, {}).get(k, []))

    rows = []

    def add(what, value, target, ok, note=""):
        verdict = "–" if ok is None else ("met" if ok else "**missed**")
        rows.append(f"| {what} | {value} | {target} | {verdict} | {note} |")

    for load in [l[0] for l in data["loads"]]:
        r = ratio(g(DYN, f"steady_{load}_rps"), g(REF_STATIC, f"steady_{load}_rps"))
        add(f"overhead `{load}`: drove 2..16 / drove static 16 (req/s)", fmt(r, "", 3), f"≥ {T_OVERHEAD}",
            None if r is None else r >= T_OVERHEAD)
    for load in [l[0] for l in data["loads"]]:
        r = ratio(g(REF_STATIC, f"steady_{load}_rps"), g("bare-py-16", f"steady_{load}_rps"))
        add(f"overhead `{load}`: drove static 16 / no supervisor (Python)", fmt(r, "", 3), f"≥ {T_OVERHEAD}",
            None if r is None else r >= T_OVERHEAD)
    r = ratio(g("drove-rust-16", "steady_hello_rps"), g("bare-rust-16", "steady_hello_rps"))
    add("overhead `hello`: drove static 16 / no supervisor (Rust worker)", fmt(r, "", 3), f"≥ {T_OVERHEAD}",
        None if r is None else r >= T_OVERHEAD)
    p99 = g(DYN, "burst_p99_ms")
    r = ratio(p99, g(REF_STATIC, "burst_p99_ms"))
    add("burst p99: drove 2..16 / drove static 16", fmt(r, "×", 2), f"≤ {T_P99_VS_STATIC}×",
        None if r is None else r <= T_P99_VS_STATIC)
    r = ratio(g(DYN, "burst_log_p99_ms"), g(REF_STATIC, "burst_log_p99_ms"))
    add("… the same from raw per-request latencies", fmt(r, "×", 2), f"≤ {T_P99_VS_STATIC}×",
        None if r is None else r <= T_P99_VS_STATIC, "without wrk's coordinated-omission correction")
    for other in ("gunicorn-16", "uwsgi-16"):
        r = ratio(p99, g(other, "burst_p99_ms"))
        add(f"burst p99: drove 2..16 / {other}", fmt(r, "×", 2), "(reference)", None)
    for other in ("gunicorn-2", "uwsgi-cheaper4"):
        r = ratio(p99, g(other, "burst_p99_ms"))
        add(f"burst p99: drove 2..16 / {other}", fmt(r, "×", 2), "well below 1", None if r is None else r < 0.5,
            "read as met when below 0.5×")
    t = g(DYN, "time_to_max_ms")
    add("pool at max (16 processes) after the burst starts", fmt_ms(t), f"≤ {T_TO_MAX_MS:.0f} ms",
        None if t is None else t <= T_TO_MAX_MS)
    t = g(DYN, "time_to_max_ready_ms")
    add("… 16 workers ready (READY=1)", fmt_ms(t), f"≤ {T_TO_MAX_MS:.0f} ms", None if t is None else t <= T_TO_MAX_MS,
        "stricter: includes Python start-up")
    c = g(DYN, "idle_sup_cpu_pct")
    add("supervisor idle CPU, drove 2..16", fmt(c, " % of a core", 3), f"≤ {T_IDLE_CPU_PCT} %",
        None if c is None else c <= T_IDLE_CPU_PCT)
    return "\n".join(["| target | measured (median) | goal | verdict | note |", "|---|---|---|---|---|"] + rows)


def median_run(data, name):
    runs = [r for r in data["runs"] if r["contender"] == name and r.get("burst")]
    if not runs:
        return None
    runs.sort(key=lambda r: r["burst"].get("p99_ms") or 0)
    return runs[len(runs) // 2]


def plot(data, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cs = [c for c in data["contenders"] if "burst" in c["scenarios"]]
    burst = data["params"]["burst"]
    fig, axes = plt.subplots(3, 2, figsize=(15, 11), sharex="col",
                             gridspec_kw={"width_ratios": [2.2, 1]})
    bucket = 0.25
    zb = 0.05
    for c in cs:
        run = median_run(data, c["name"])
        if not run:
            continue
        b = run["burst"]
        col, st, lab = c["color"], c["style"], c["label"]
        wt = [t for t, _ in b["workers"]]
        wn = [n for _, n in b["workers"]]
        reqs = b["requests_log"]
        for ax_w, ax_l, ax_t, bk in ((axes[0][0], axes[1][0], axes[2][0], bucket),
                                     (axes[0][1], axes[1][1], axes[2][1], zb)):
            ax_w.step(wt, wn, where="post", color=col, linestyle=st, linewidth=1.8, label=lab)
            if c["name"] == DYN and b.get("notify"):
                nt = [0.0] + [t for t, _, _ in b["notify"] if t >= 0]
                nn = [MINW(b)] + [n for t, n, _ in b["notify"] if t >= 0]
                ax_w.step(nt, nn, where="post", color=col, linestyle=":", linewidth=1.5,
                          label=lab + ": ready (READY=1)")
            # latency by send time: p99 and median per bucket
            groups = {}
            for t, lat, _ in reqs:
                groups.setdefault(math.floor(t / bk), []).append(lat)
            ks = sorted(groups)
            p99 = []
            for k in ks:
                g = sorted(groups[k])
                p99.append(g[min(len(g) - 1, int(len(g) * 0.99))])
            ax_l.plot([(k + 0.5) * bk for k in ks], p99, color=col, linestyle=st, linewidth=1.5,
                      marker="." if bk == zb else None, label=lab)
            # throughput by completion time
            done = {}
            for t, lat, _ in reqs:
                k = math.floor((t + lat / 1000) / bk)
                done[k] = done.get(k, 0) + 1
            ks = sorted(done)
            ax_t.plot([(k + 0.5) * bk for k in ks], [done[k] / bk for k in ks], color=col,
                      linestyle=st, linewidth=1.5, label=lab)
    axes[0][0].set_title(f"Burst: wrk -t2 -c{data['params']['burst_conns']} "
                         f"{data['params']['burst_path']} for {burst} s on an idle pool "
                         f"(median-p99 run of each)")
    axes[0][1].set_title("first 1.5 s")
    axes[0][0].set_ylabel("worker processes")
    axes[1][0].set_ylabel(f"p99 latency by send time (ms, log)")
    axes[2][0].set_ylabel("completed req/s")
    for row in axes:
        for ax in row:
            ax.grid(True, alpha=0.3)
            ax.axvline(0, color="black", linewidth=0.8)
    for ax in axes[1]:
        ax.set_yscale("log")
    for ax in axes[0]:
        ax.set_ylim(0, 17.5)
        ax.axhline(0.25, color="none")
    axes[0][1].axvline(T_TO_MAX_MS / 1000, color="red", linewidth=0.8, linestyle="--")
    axes[0][1].text(T_TO_MAX_MS / 1000 + 0.02, 1, "250 ms target", color="red", fontsize=8)
    axes[0][0].set_xlim(-0.5, burst + 1)
    axes[0][1].set_xlim(-0.1, 1.5)
    axes[2][0].set_xlabel("seconds since the first request of the burst")
    axes[2][1].set_xlabel("seconds (zoom; 50 ms buckets)")
    axes[1][0].set_title(f"p99 latency of requests sent in each {int(bucket * 1000)} ms", fontsize=10)
    axes[2][0].set_title(f"throughput, {int(bucket * 1000)} ms buckets", fontsize=10)
    axes[0][0].legend(loc="lower right", fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def MINW(b):
    ws = [n for t, n in b["workers"] if t < 0]
    return ws[-1] if ws else 0


def write(data, out):
    agg = collect(data)
    v = data["versions"]
    p = data["params"]
    parts = [
        "# Benchmark results",
        "",
        f"Run {data['started']} by `bench/run` ({p['repeats']} repeat(s), medians; "
        f"{data.get('duration_s', '?')} s). drove `{v['drove']}`, {v['gunicorn']}, uWSGI {v['uwsgi']}, "
        f"Python {v['python']}, {v['wrk']}; {v['cores']} × {v['cpu']}, Linux {v['kernel']}.",
        "",
        f"Steady: wrk -t2 each load, {p['warm']} s warm-up then {p['steady']} s measured. "
        f"Burst: after {p['idle']:.0f} s idle, wrk -t2 -c{p['burst_conns']} -d{p['burst']}s "
        f"`{p['burst_path']}`. Idle: {p['idle']:.0f} s with no requests (RSS/PSS at the end). "
        "p50/p99/max are wrk's: wrk 4 adds synthetic samples for requests a slow response "
        "held back (its coordinated-omission correction), which raises p99 after a stall; "
        "'p99 raw' is the 99th percentile of the per-request latencies logged by burst.lua. "
        "Time to 16 procs: from the first request of the burst to the first 20 ms sample with 16 "
        "children of the supervisor (for drove also until 16 workers had sent READY=1).",
        "",
        "## Medians",
        "",
        table(data, agg),
        "",
        "## Against issue 4's targets",
        "",
        targets(data, agg),
        "",
        "## Every repeat",
        "",
        spread(data, agg),
        "",
        "Other load: CPU used meanwhile by processes other than the contender, wrk and the "
        "benchmark script, in % of all cores (this machine is shared; a repeat with a high "
        "value is suspect). Idle phases, whole-machine busy share: "
        + ", ".join(f"`{n}` {fmt(med(a.get('idle_machine_busy_pct', [])), ' %', 1)}"
                    for n, a in agg.items() if a.get("idle_machine_busy_pct")),
        "",
        "![burst](burst.png)",
        "",
    ]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(parts))
    plot(data, os.path.join(out, "burst.png"))
