"""Benchmark reports: markdown tables, the speculation bars, PNG plots.

Rows are level summaries (``stats.summarize``) with ``workload``, ``config``, ``load``
("concurrency" or "rate") and ``level`` added.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Sequence

from jaxspec.bench.configs import BenchConfig, baseline_of


def fmt(x, spec: str, suffix: str = "") -> str:
    return "-" if x is None else format(x, spec) + suffix


def div(a, b):
    return a / b if a is not None and b else None


def level_name(load: str, level) -> str:
    return f"{level:g} conc" if load == "concurrency" else f"{level:g} req/s"


def _key(r: dict) -> tuple:
    return r["workload"], r["config"], r["load"], r["level"]


def _table(head: list[str], rows: list[list[str]], align_left: int = 1) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * align_left + "---:|" * (len(head) - align_left)]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(rows: Sequence[dict], configs: Sequence[BenchConfig], *, slo: bool = False, cost: bool = False) -> str:
    """Per workload: the comparison (each config against its group's plain config), the detail table and
    the acceptance per draft position."""
    by = {_key(r): r for r in rows}
    lines: list[str] = []
    for w in dict.fromkeys(r["workload"] for r in rows):
        lines += [f"### workload `{w}`", ""]
        for load in dict.fromkeys(r["load"] for r in rows if r["workload"] == w):
            levels = sorted({r["level"] for r in rows if r["workload"] == w and r["load"] == load})
            for group in dict.fromkeys(c.group for c in configs):
                members = [c for c in configs if c.group == group]
                for what, key, unit in (("output tokens/s", "tok_s", ".1f"), ("P99 end-to-end s", "e2e_p99", ".3f")):
                    body = []
                    for lv in levels:
                        cells = [level_name(load, lv)]
                        for c in members:
                            r = by.get((w, c.name, load, lv))
                            base = baseline_of(c, list(configs))
                            b = base and by.get((w, base.name, load, lv))
                            ratio = div(r and r[key], b and b[key]) if c.method != "none" else None
                            cells.append(fmt(r and r[key], unit) + (f" ({ratio:.2f}x)" if ratio is not None else ""))
                        body.append(cells)
                    title = f"{what}" + (f", serve flags `{' '.join(group)}`" if group else "")
                    lines += [f"{title} (in brackets: against plain decoding of the same target):", ""]
                    lines += _table(["level"] + [c.name for c in members], body) + [""]
        head = ["config", "level", "tok/s", "req/s", "e2e P50", "P90", "P95", "P99", "TTFT P50", "TTFT P99",
                "ITL P50", "ITL P95", "acc len", "acc rate", "failed", "short", "same"]
        head += ["goodput req/s"] if slo else []
        head += ["$/M tok"] if cost else []
        body = []
        for r in (r for r in rows if r["workload"] == w):
            fails = ", ".join(f"{k} {v}" for k, v in r["failures"].items())
            cells = [r["config"], level_name(r["load"], r["level"]), f"{r['tok_s']:.1f}", f"{r['req_s']:.2f}",
                     *(fmt(r[f"e2e_p{q}"], ".3f") for q in (50, 90, 95, 99)),
                     fmt(r["ttft_p50"], ".3f"), fmt(r["ttft_p99"], ".3f"),
                     fmt(r["itl_p50"] and r["itl_p50"] * 1e3, ".1f", " ms"),
                     fmt(r["itl_p95"] and r["itl_p95"] * 1e3, ".1f", " ms"),
                     fmt(r["mean_acceptance_length"], ".2f"), fmt(r["acceptance_rate"], ".2f"),
                     f"{r['failed']}/{r['requests']}" + (f" ({fails})" if fails else ""), str(r["short"]),
                     fmt(r.get("same_as_plain"), ".0%")]
            cells += [fmt(r.get("goodput_req_s"), ".2f")] if slo else []
            cells += [fmt(r.get("cost_per_mtok"), ".2f")] if cost else []
            body.append(cells)
        lines += ["Seconds unless marked; TTFT from the " + ", ".join(sorted({r["ttft_source"] for r in rows
                                                                              if r["workload"] == w}))
                  + " side.", ""] + _table(head, body, 2) + [""]
        spec = [r for r in rows if r["workload"] == w and r["acceptance_per_position"]]
        if spec:
            width = max(len(r["acceptance_per_position"]) for r in spec)
            body = [[r["config"], level_name(r["load"], r["level"])]
                    + [fmt(p, ".2f") for p in r["acceptance_per_position"]] + ["-"] * (width - len(
                        r["acceptance_per_position"])) for r in spec]
            lines += ["Acceptance per draft position (accepted / drafted at position i):", ""]
            lines += _table(["config", "level"] + [f"pos {i + 1}" for i in range(width)], body, 2) + [""]
    return "\n".join(lines)


def bars(rows: Sequence[dict], configs: Sequence[BenchConfig]) -> list[dict]:
    """The engine's speculation bars at the levels this run measured (closed-loop levels only): adaptive
    draft >= 1.3x plain at 4 and 8 concurrent, >= 0.97x the best of plain and the fixed-k drafts at
    1-16, P99 <= 1.05x plain's; n-gram on the edit workload >= 1.5x plain at 1 with mean acceptance
    length >= 3.5."""
    by = {_key(r): r for r in rows if r["load"] == "concurrency"}
    out = []

    def bar(name, w, lv, value, need, at_least=True):
        if value is not None:
            out.append(dict(bar=name, workload=w, level=lv, value=value, need=need, rel=">=" if at_least else "<=",
                            met=value >= need if at_least else value <= need))

    for (w, name, _, lv), r in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][3])):
        c = next(c for c in configs if c.name == name)
        base = baseline_of(c, list(configs))
        plain = base and by.get((w, base.name, "concurrency", lv))
        if not plain or c.method == "none":
            continue
        if c.is_auto_draft:
            if lv in (4, 8):
                bar(f"{name} >= 1.3x plain tok/s", w, lv, div(r["tok_s"], plain["tok_s"]), 1.3)
            if lv in (1, 2, 4, 8, 16):
                fixed = [by[w, f.name, "concurrency", lv]["tok_s"] for f in configs
                         if f.is_fixed_draft and f.group == c.group and (w, f.name, "concurrency", lv) in by]
                bar(f"{name} >= 0.97x best of plain and fixed k", w, lv,
                    div(r["tok_s"], max([plain["tok_s"]] + fixed)), 0.97)
            bar(f"{name} P99 <= 1.05x plain's", w, lv, div(r["e2e_p99"], plain["e2e_p99"]), 1.05, at_least=False)
        if c.method == "ngram" and w.partition(":")[0] == "edit" and lv == 1:
            bar(f"{name} >= 1.5x plain tok/s on edit", w, lv, div(r["tok_s"], plain["tok_s"]), 1.5)
            bar(f"{name} mean acceptance length >= 3.5 on edit", w, lv, r["mean_acceptance_length"], 3.5)
    return out


def bars_text(out: Sequence[dict]) -> str:
    return "\n".join(f"- {b['bar']} [{b['workload']}, {b['level']:g} concurrent]: {b['value']:.2f} "
                     f"(need {b['rel']} {b['need']}): {'met' if b['met'] else '**not met**'}" for b in out)


def _save(fig, axes, path: Path) -> Path:
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)  # ten configurations: two columns keep the legend off the lines
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plots(rows: Sequence[dict], configs: Sequence[BenchConfig], out_dir: Path) -> list[Path]:
    """Latency percentiles against load, the throughput/P99 frontier and the acceptance per position,
    one set per workload. Needs matplotlib (the ``bench`` extra)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    names = [c.name for c in configs]
    for w in dict.fromkeys(r["workload"] for r in rows):
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in w)
        series = collections.defaultdict(list)
        for r in rows:
            if r["workload"] == w:
                series[r["config"], r["load"]].append(r)
        for load in dict.fromkeys(r["load"] for r in rows if r["workload"] == w):
            fig, axes = plt.subplots(1, 2, figsize=(11, 4))
            for name in names:
                pts = sorted(series.get((name, load), []), key=lambda r: r["level"])
                pts = [p for p in pts if p["e2e_p99"] is not None]
                if not pts:
                    continue
                x = [p["level"] for p in pts]
                line, = axes[0].plot(x, [p["e2e_p99"] for p in pts], marker="o", label=f"{name} P99")
                axes[0].plot(x, [p["e2e_p50"] for p in pts], marker=".", ls="--", color=line.get_color(),
                             label=f"{name} P50")
                axes[1].plot([p["tok_s"] for p in pts], [p["e2e_p99"] for p in pts], marker="o",
                             color=line.get_color(), label=name)
            axes[0].set(xlabel=load, ylabel="end-to-end latency (s)", title=f"{w}: latency vs {load}")
            axes[0].set_xscale("log", base=2)
            ticks = sorted({r["level"] for r in rows if r["workload"] == w and r["load"] == load})
            axes[0].set_xticks(ticks, [f"{t:g}" for t in ticks])
            axes[0].minorticks_off()
            axes[1].set(xlabel="output tokens/s", ylabel="P99 end-to-end (s)", title=f"{w}: throughput vs P99")
            written.append(_save(fig, axes, out_dir / f"latency_{safe}_{load}.png"))
        spec = [r for r in rows if r["workload"] == w and r["acceptance_per_position"]]
        if spec:
            fig, ax = plt.subplots(figsize=(6, 4))
            for name in names:
                # The lowest level's figures: acceptance belongs to the draft and the text, not the load.
                pts = [r for r in spec if r["config"] == name]
                if pts:
                    first = min(pts, key=lambda r: r["level"])
                    acc = first["acceptance_per_position"]
                    ax.plot(range(1, len(acc) + 1), acc, marker="o",
                            label=f"{name} ({level_name(first['load'], first['level'])})")
            ax.set(xlabel="draft position", ylabel="accepted / drafted", ylim=(0, 1.05),
                   title=f"{w}: acceptance per position")
            written.append(_save(fig, [ax], out_dir / f"acceptance_{safe}.png"))
    return written
