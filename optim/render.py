"""Renderers: they read only report JSON (so saved reports from any run can be shown/compared)."""

from __future__ import annotations

import html
from typing import Any

from rich.console import Console, Group
from rich.table import Table


def _fmt(x: Any, digits: int = 4) -> str:
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return "-" if x is None else str(x)


def _ms(row: dict | None) -> str:
    if not row:
        return "-"
    if row["status"] == "measured":
        return f"{row['median_ms']:.1f} ms (p10 {row['p10_ms']:.1f}, p90 {row['p90_ms']:.1f}; {row['runs']} runs)"
    return f"{row.get('median_ms', 0):.2f} ms ({row['status']} by {row.get('by', '?')})"


def summary_rows(d: dict) -> list[tuple[str, str]]:
    lat = {r["label"]: r for r in d["latency"]}
    fid = d["fidelity"]["outputs"]
    rows = [("model", f"{d['model']['name']}  ({d['model']['parameters'] / 1e6:.1f} M params, "
                      f"{d['model']['flops'] / 1e9:.2f} GFLOP per call)"),
            ("target / backend", f"{d['target']['name']} / {d['backend']['name']}"),
            ("pipeline", ", ".join(p["name"] for p in d["passes"]) or "(none)")]
    for label, row in lat.items():
        rows.append((f"latency {label}", f"{_ms(row)} [{row['status']}]"))
    if "optimized_vs_original" in d.get("speedup", {}):
        rows.append(("speedup", f"{d['speedup']['optimized_vs_original']:.2f}x "
                                f"({d['speedup']['basis']})"))
    pad = " (padding excluded)" if d["fidelity"].get("padding") == "excluded" else ""
    rows.append((f"output fidelity{pad}", f"cosine mean {_fmt(fid['cosine_mean'], 6)}, "
                                    f"min {_fmt(fid['cosine_min'], 6)}, SQNR {_fmt(fid['sqnr_db'], 3)} dB, "
                                    f"max abs err {_fmt(fid['max_abs_error'], 3)}"))
    for k, v in d["fidelity"].get("task", {}).items():
        rows.append((f"task: {k}", _fmt(v, 5)))
    wb, wa = d["model"]["weight_bytes"], d["model"].get("weight_bytes_after", d["model"]["weight_bytes"])
    rows.append(("weights", f"{wb / 2**20:.1f} MiB -> {wa / 2**20:.1f} MiB"))
    for w in d.get("warnings", []):
        rows.append(("WARNING", w))
    return rows


def pass_rows(d: dict) -> list[tuple[str, str, str, str, str]]:
    out = []
    for p in d["passes"]:
        counts = ", ".join(f"{k}={v}" for k, v in p["counts"].items()) or "no change"
        skipped = f"{len(p['skipped'])} skipped" if p["skipped"] else ""
        if p["skipped"]:
            skipped += ": " + "; ".join(sorted({s["reason"] for s in p["skipped"]}))[:120]
        f = p.get("fidelity") or {}
        fid = f"cos {_fmt(f.get('cosine_min'), 6)}, SQNR {_fmt(f.get('sqnr_db'), 3)} dB" if f else "-"
        out.append((p["name"], counts, skipped, fid, f"{p['seconds']:.2f}s"))
    return out


def to_rich(d: dict) -> Group:
    t = Table(title="optim report", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    for k, v in summary_rows(d):
        t.add_row(k, v)
    p = Table(title="passes", title_justify="left")
    for c in ("pass", "what changed", "skipped", "fidelity after (vs original)", "time"):
        p.add_column(c)
    for row in pass_rows(d):
        p.add_row(*row)
    return Group(t, p)


def print_report(d: dict, console: Console | None = None) -> None:
    (console or Console()).print(to_rich(d))


def to_markdown(d: dict) -> str:
    lines = ["# optim report", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary_rows(d)]
    lines += ["", "## Passes", "", "| pass | what changed | skipped | fidelity after | time |",
              "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in pass_rows(d)]
    return "\n".join(lines) + "\n"


def to_html(d: dict) -> str:
    esc = html.escape
    summary = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in summary_rows(d))
    passes = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in pass_rows(d))
    ops = "".join(f"<tr><td>{esc(k)}</td><td>{d['graph']['before'].get(k, 0)}</td>"
                  f"<td>{d['graph']['after'].get(k, 0)}</td></tr>"
                  for k in sorted(set(d["graph"]["before"]) | set(d["graph"]["after"])))
    skipped = "".join(f"<tr><td>{esc(p['name'])}</td><td>{esc(s['where'])}</td><td>{esc(s['reason'])}</td></tr>"
                      for p in d["passes"] for s in p["skipped"])
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>optim report</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:70em}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left}}
th{{background:#f4f4f4}}</style></head><body>
<h1>optim report: {esc(d['model']['name'])} on {esc(d['target']['name'])}</h1>
<table>{summary}</table>
<h2>Passes</h2><table><tr><th>pass</th><th>what changed</th><th>skipped</th><th>fidelity after</th><th>time</th></tr>{passes}</table>
<h2>Skipped matches</h2><table><tr><th>pass</th><th>where</th><th>reason</th></tr>{skipped or '<tr><td colspan=3>none</td></tr>'}</table>
<h2>Graph ops before / after</h2><table><tr><th>op</th><th>before</th><th>after</th></tr>{ops}</table>
<p>Every latency is labelled measured (here, interleaved runs) or estimated (by what). Generated {esc(d['created'])} by optim {esc(d.get('optim_version', ''))}.</p>
</body></html>"""


def compare_table(reports: list[tuple[str, dict]]) -> Table:
    t = Table(title="optim compare", title_justify="left")
    t.add_column("metric", style="bold")
    for name, _ in reports:
        t.add_column(name)
    def row(label, fn):
        vals = []
        for _, d in reports:
            try:
                vals.append(fn(d))
            except (KeyError, TypeError, StopIteration):
                vals.append("-")
        t.add_row(label, *vals)
    row("model", lambda d: d["model"]["name"])
    row("target", lambda d: d["target"]["name"])
    row("backend", lambda d: d["backend"]["name"])
    row("passes", lambda d: ", ".join(p["name"] for p in d["passes"]))
    row("original latency", lambda d: _ms(next(r for r in d["latency"] if r["label"] == "original")))
    row("optimized latency", lambda d: _ms(next(r for r in d["latency"] if r["label"] == "optimized")))
    row("speedup (same run)", lambda d: f"{d['speedup']['optimized_vs_original']:.2f}x")
    row("cosine min", lambda d: _fmt(d["fidelity"]["outputs"]["cosine_min"], 6))
    row("SQNR dB", lambda d: _fmt(d["fidelity"]["outputs"]["sqnr_db"], 3))
    keys = sorted({k for _, d in reports for k in d["fidelity"].get("task", {})})
    for k in keys:
        row(f"task {k}", lambda d, k=k: _fmt(d["fidelity"]["task"][k], 5))
    row("weights MiB", lambda d: f"{d['model'].get('weight_bytes_after', 0) / 2**20:.1f}")
    return t
