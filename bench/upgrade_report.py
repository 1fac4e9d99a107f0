# Used by bench/upgrade.py (and `bench/upgrade --report-only`); not run by hand.
# SPDX-License-Identifier: MIT OR Apache-2.0
"""upgrade.md (table) and upgrade.png (throughput over time, operations
marked) from upgrade.json."""

import os
import statistics


def fmt_ms(v):
    if v is None:
        return "–"
    return f"{v / 1000:.2f} s" if v >= 1000 else f"{v:.0f} ms"


def fmt_s(xs):
    if not xs:
        return "–"
    return f"{statistics.median(xs):.2f} s (max {max(xs):.2f})"


def failed_detail(r):
    se = r.get("socket_errors") or {}
    parts = [f"{k} {v}" for k, v in se.items() if v]
    if r.get("non2xx"):
        parts.append(f"non-2xx {r['non2xx']}")
    return ", ".join(parts)


def pre_dip(r):
    """Worst bucket over the median of the full buckets before the first
    operation: the fairer baseline when operations fill most of the window
    (uWSGI's chain reloads)."""
    if not r["ops"]:
        return "–"
    pre = r["buckets"][1:int(r["ops"][0]["sent"])]
    if not pre:
        return "–"
    return f"{r['worst_bucket'] / statistics.median(pre):.2f}"


def table(data):
    n_ops = data["params"]["ops"]
    rows = [
        "| scenario | ops done | op took, median (max) | requests ok | failed | req/s | median 1 s | "
        "worst 1 s | dip (worst / median) | worst / before 1st op | short of median | p99 | max | "
        "peak procs | supervisor PID | other load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["runs"]:
        if "failed" in r and isinstance(r["failed"], str):
            rows.append(f"| {r['label']} | FAILED: {r['failed']} |" + " |" * 14)
            continue
        detail = failed_detail(r)
        failed = f"**{r['failed']:,}** ({detail})" if r["failed"] else "0"
        if r["pid_same"]:
            pid = "same"
        else:
            pid = f"**changed** ({r['pid_start']} → {r['pid_end']})"
        rows.append(
            f"| {r['label']} | {len(r['op_s'])}/{n_ops} | {fmt_s(r['op_s'])} | {r['ok']:,} | {failed} | "
            f"{r['rps']:.0f} | {r['median_bucket']:.0f} | {r['worst_bucket']} (s {r['worst_bucket_at']}) | "
            f"{r['dip']:.2f} | {pre_dip(r)} | {r['deficit']:,} req | {fmt_ms(r['p99_ms'])} | {fmt_ms(r['max_ms'])} | "
            f"{r['peak_procs']} | {pid} | {r['load']['other_cpu_pct']} % |"
        )
    return "\n".join(rows)


def write(data, out):
    p = data["params"]
    v = data["versions"]
    md = [
        "# Upgrade and reload under load (issue 6)",
        "",
        f"Run {data['started']} by `bench/upgrade` ({data.get('duration_s', '?')} s). "
        f"drove `{v['drove']}`, {v['gunicorn']}, uWSGI {v['uwsgi']}, Python {v['python']}, "
        f"{v['wrk']}; {v['cores']} × {v['cpu']}, Linux {v['kernel']}.",
        "",
        f"Each scenario: a fresh pool of {data['pool']} workers of `bench/app.py`, "
        f"`wrk -t2 -c{p['conns']} --timeout 10s` on `{p['path']}` for {p['window']} s, "
        f"{p['ops']} operations at {p['window']}·k/{p['ops'] + 1} s, each waited for until done "
        "(drove: READY=1 on NOTIFY_SOCKET; gunicorn and uWSGI: every old worker gone and "
        f"{data['pool']} new ones have loaded the app). *failed* = wrk's socket errors "
        "(connect, read, write, timeout) + non-2xx responses. Throughput counts 2xx responses by "
        "completion time in 1 s buckets, without the first and last (partial) bucket; "
        "*short of median* sums, over all buckets, how far each fell below the median. "
        "*peak procs*: masters + workers at the busiest 0.1 s sample. *other load*: CPU "
        "used by anything but the contender and wrk, in % of all cores.",
        "",
        table(data),
        "",
        "Operation times, s (sent → done):",
        "",
    ]
    for r in data["runs"]:
        if "op_s" in r:
            errs = f"; errors: {r['op_errors']}" if r.get("op_errors") else ""
            md.append(f"- {r['label']}: {', '.join(f'{x:.2f}' for x in r['op_s'])}{errs}")
    md += ["", "![throughput over time](upgrade.png)", ""]
    with open(os.path.join(out, "upgrade.md"), "w") as f:
        f.write("\n".join(md))
    plot(data, os.path.join(out, "upgrade.png"))


def plot(data, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in data["runs"] if "buckets" in r]
    if not runs:
        return
    cols = 2
    rows = (len(runs) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(13, 3.1 * rows + 0.8), sharex=True, sharey=True,
                             squeeze=False)
    colors = {s["name"]: s["color"] for s in data["scenarios"]}
    ymax = max(max(r["buckets"]) for r in runs) * 1.25
    win = data["params"]["window"]
    for ax in axes.flat[len(runs):]:
        ax.set_visible(False)
    for ax, r in zip(axes.flat, runs):
        b = r["buckets"]
        xs = [k + 0.5 for k in range(len(b))]
        ax.step(xs, b, where="mid", color=colors.get(r["scenario"], "k"), lw=1.8, label="2xx req/s (1 s)")
        ax.axhline(r["median_bucket"], color="0.5", lw=0.8, ls=":", label="median")
        for i, o in enumerate(r["ops"]):
            end = o.get("done", win)
            ax.axvspan(o["sent"], max(end, o["sent"] + 0.15), color="0.6", alpha=0.35,
                       label="operation (sent → done)" if i == 0 else None)
        ax2 = ax.twinx()
        ax2.plot([t for t, _ in r["procs"]], [n for _, n in r["procs"]], color="k", lw=0.7, alpha=0.6,
                 label="processes (masters + workers)")
        ax2.set_ylim(0, 36)
        ax2.tick_params(labelsize=8, colors="0.35")
        if ax in axes[:, -1]:
            ax2.set_ylabel("processes", fontsize=8, color="0.35")
        else:
            ax2.set_yticklabels([])
        pid = "PID same" if r["pid_same"] else "PID changed"
        ax.set_title(f"{r['label']}\nfailed {r['failed']:,} · dip {r['dip']:.2f} · p99 {fmt_ms(r['p99_ms'])} · "
                     f"{pid}", fontsize=9)
        ax.set_ylim(0, ymax)
        ax.set_xlim(0, win)
        ax.grid(alpha=0.3)
        if ax in axes[:, 0]:
            ax.set_ylabel("req/s")
        if ax in axes[-1, :]:
            ax.set_xlabel("s since the load started")
    h1, l1 = axes.flat[0].get_legend_handles_labels()
    h2, l2 = axes.flat[0].figure.axes[-1].get_legend_handles_labels()
    fig.legend(h1 + h2, l1 + l2, loc="lower center", ncol=4, fontsize=9, frameon=False)
    p = data["params"]
    fig.suptitle(f"Upgrade / reload under load: {data['pool']} workers, wrk -c{p['conns']} {p['path']}, "
                 f"{p['ops']} operations per {p['window']} s", fontsize=11)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
