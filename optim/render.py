"""Renderers: they read only report JSON (so saved reports from any run can be shown/compared),
plus, for HTML, optional pre-rendered PNG bytes (rooflines). Every latency figure carries its
status: measured (here), estimated (cost model, by what) or bound (datasheet roofline)."""

from __future__ import annotations

import base64
import html
from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from hardware.plots import stage_bars_png


def _fmt(x: Any, digits: int = 4) -> str:
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return "-" if x is None else str(x)


def _num(x: Any, digits: int = 3) -> str:
    """A number to `digits` significant figures; '-' for missing, as-is for 'inf' and the like."""
    if isinstance(x, bool) or x is None:
        return "-"
    if isinstance(x, (int, float)):
        return f"{x:,.0f}" if abs(x) >= 10 ** digits else f"{x:.{digits}g}"
    return str(x)


def _ms(row: dict | None) -> str:
    """A latency row as text, always with its status."""
    if not row:
        return "-"
    status = row.get("status", "?")
    if status == "measured":
        return (f"{_num(row['median_ms'])} ms measured (p10 {_num(row['p10_ms'])}, "
                f"p90 {_num(row['p90_ms'])}; {row['runs']} runs)")
    return f"{_num(row.get('median_ms'))} ms {status} (by {row.get('by', '?')})"


def summary_rows(d: dict) -> list[tuple[str, str]]:
    lat = {r["label"]: r for r in d["latency"]}
    fid = d["fidelity"]["outputs"]
    rows = [("model", f"{d['model']['name']}  ({d['model']['parameters'] / 1e6:.1f} M params, "
                      f"{d['model']['flops'] / 1e9:.2f} GFLOP per call)"),
            ("target / backend", f"{d['target']['name']} / {d['backend']['name']}"
             + (f" ({d['backend']['chosen_because']})" if d["backend"].get("chosen_because")
                else "")),
            ("pipeline", ", ".join(p["name"] for p in d["passes"]) or "(none)")]
    if d["model"].get("shapes"):
        rows.append(("input shapes", _shapes(d["model"]["shapes"])))
    be = d["backend"]
    if "schedule" in be:  # compiled backends: what compiled it, how tuned, how long it took
        tuning = be.get("tuning") or {}
        tuned = (f", {tuning['workloads']} matmul workloads: {tuning['from_cache']} from cache, "
                 f"{tuning['tuned_now']} tuned now in {tuning['seconds']} s"
                 if tuning.get("workloads") else "")
        if tuning.get("buckets"):  # dynamic shapes: tiles chosen per shape bucket
            tuned += (f"; shape buckets {', '.join(tuning['buckets'])} "
                      f"({tuning.get('dispatched_per_bucket', 0)} kernels switch tile by bucket)")
        rows.append(("compiled", f"{be.get('runtime', be['name'])}, {be['schedule']}{tuned}; "
                                 f"compile {be.get('compile_seconds', '-')} s"))
    for label, row in lat.items():
        rows.append((f"latency {label}", _ms(row)))
    if "optimized_vs_original" in d.get("speedup", {}):
        rows.append(("speedup", f"{d['speedup']['optimized_vs_original']:.2f}x "
                                f"({d['speedup']['basis']})"))
    if "decode_tokens_per_s" in d.get("speedup", {}):
        rows.append(("speedup", f"decode {d['speedup']['decode_tokens_per_s']:.2f}x tokens/s, "
                                f"time to first token {d['speedup']['time_to_first_token']:.2f}x "
                                f"({d['speedup']['basis']})"))
    pad = " (padding excluded)" if d["fidelity"].get("padding") == "excluded" else ""
    rows.append((f"output fidelity{pad}",
                 f"cosine mean {_fmt(fid['cosine_mean'], 6)}, "
                 f"min {_fmt(fid['cosine_min'], 6)}, SQNR {_fmt(fid['sqnr_db'], 3)} dB, "
                 f"max abs err {_fmt(fid['max_abs_error'], 3)}"))
    for other in d["fidelity"].get("other_shapes", []):
        rows.append((f"fidelity at {other['shape']}",
                     f"cosine mean {_fmt(other['cosine_mean'], 6)}, "
                     f"min {_fmt(other['cosine_min'], 6)}"))
    for k, v in d["fidelity"].get("task", {}).items():
        rows.append((f"task: {k}", _fmt(v, 5)))
    rows += generation_rows(d)
    wb, wa = (d["model"]["weight_bytes"],
              d["model"].get("weight_bytes_after", d["model"]["weight_bytes"]))
    rows.append(("weights", f"{wb / 2**20:.1f} MiB -> {wa / 2**20:.1f} MiB"))
    for w in d.get("warnings", []):
        rows.append(("WARNING", w))
    return rows


def generation_rows(d: dict) -> list[tuple[str, str]]:
    """A causal LM's report: greedy tokens and perplexity against the original, measured
    generation speed, and the KV cache."""
    gen, fid, rows = d.get("generation"), d["fidelity"], []
    if not gen:
        return rows
    g = fid.get("greedy")
    if g:
        rows.append(("greedy tokens vs transformers", f"identical ({g['tokens']} tokens)"
                     if g["identical"] else
                     f"{g['agreement']:.1%} agree; first difference at token "
                     f"{min(g['first_difference'])} (original's logit margin there: "
                     + ", ".join(_fmt(m, 3) for m in g.get("margins_at_difference", [])) + ")"))
    p = fid.get("perplexity")
    if p:
        rows.append(("perplexity (eval_data)", f"{_fmt(p['original'], 5)} -> "
                                               f"{_fmt(p['optimized'], 5)} "
                                               f"({p['relative_change']:+.2%}, {p['tokens']} "
                                               f"tokens)"))
    m = gen.get("measured")
    if m:
        rows.append(("generation (measured)",
                     f"batch {m['batch']}, prompt {m['prompt_tokens']}, {m['new_tokens']} new: "
                     f"TTFT {_num(m['original_ttft_ms'])} -> {_num(m['optimized_ttft_ms'])} ms, "
                     f"{_num(m['original_per_token_ms'])} -> {_num(m['optimized_per_token_ms'])}"
                     f" ms/token, {m['original_tokens_per_s']} -> {m['optimized_tokens_per_s']} "
                     f"tokens/s"))
    c = gen["cache"]
    rows.append(("KV cache", f"{c['layers']} layers x {c['kv_heads']} kv heads x "
                             f"{c['head_dim']}, {c['bytes_per_token'] / 1024:.1f} KiB/token, up "
                             f"to {c['max_length']} tokens"))
    return rows


def _shapes(s: dict) -> str:
    """Dynamic axes with their ranges, then static ones with the reason."""
    dynamic = [f"{a} {lo}..{hi}" for a, (lo, hi) in s["ranges"].items()]
    static = [f"{a} static at {s.get('traced', {}).get(a, '?')} ({why})"
              for a, why in s["static"].items()]
    return "; ".join(dynamic + static) or "static (no batch or sequence axis)"


def pass_rows(d: dict) -> list[tuple[str, str, str, str, str]]:
    out = []
    for p in d["passes"]:
        counts = ", ".join(f"{k}={v}" for k, v in p["counts"].items()) or "no change"
        skipped = f"{len(p['skipped'])} skipped" if p["skipped"] else ""
        if p["skipped"]:
            skipped += ": " + "; ".join(sorted({s["reason"] for s in p["skipped"]}))[:120]
        f = p.get("fidelity") or {}
        fid = (f"cos {_fmt(f.get('cosine_min'), 6)}, SQNR {_fmt(f.get('sqnr_db'), 3)} dB" if f
               else "-")
        out.append((p["name"], counts, skipped, fid, f"{p['seconds']:.2f}s"))
    return out


# ---------------------------------------------------------------- per-target estimates

TARGET_COLUMNS = ("target", "kind", "status", "latency ms", "bound ms", "bound kind",
                  "throughput/s", "memory fit", "energy J", "per-pass gains", "top op")
STATUS_LEGEND = ("latency ms has the row's status: measured = timed here, interleaved runs; "
                 "estimated = optim cost model (roofline x efficiency, calibration named below). "
                 "bound ms is the roofline bound: datasheet peaks at 100% with no overhead, a "
                 "lower bound on latency")


def _bytes(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "-"
    for scale, unit in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def _gains(e: dict) -> str:
    """'cleanup 1.03x, fuse_attention 1.15x, quantize 0.67x; 0.79x overall' from the stages."""
    parts = [f"{s['after']} {s['gain_vs_previous']:.2f}x" for s in e.get("stages", [])
             if isinstance(s.get("gain_vs_previous"), (int, float))]
    total = e.get("speedup_vs_captured")
    if isinstance(total, (int, float)) and parts:
        return ", ".join(parts) + f"; {total:.2f}x overall"
    return ", ".join(parts) or "-"


def _top_op(e: dict) -> str:
    if not e.get("top_kernels"):
        return "-"
    k = e["top_kernels"][0]
    where = k.get("module") or k.get("name", "?")
    return (f"{where} ({k.get('kind', '?')} {k.get('dtype', '')}, {k.get('bound', '?')}, "
            f"{_num(k.get('seconds', 0) * 1e3)} ms)")


def _fit(mem: dict | None) -> str:
    if not mem or mem.get("fits") is None:
        return "-"
    return (f"{'yes' if mem['fits'] else 'NO'} ({_bytes(mem.get('needed_bytes'))} of "
            f"{_bytes(mem.get('capacity_bytes'))})")


def _energy(joules: Any, basis: str) -> str:
    if not isinstance(joules, (int, float)):
        return "-"
    return f"{_num(joules)} (<=)" if "upper bound" in basis else _num(joules)


def measured_row(d: dict) -> dict | None:
    """The measured 'optimized' latency row, when this report timed one."""
    return next((r for r in d.get("latency", []) if r.get("label") == "optimized"
                 and r.get("status") == "measured"), None)


def target_rows(d: dict) -> list[tuple[str, ...]]:
    """One row per target in `estimates` (columns `TARGET_COLUMNS`), plus the measured row."""
    rows = []
    for e in d.get("estimates") or []:
        energy = e.get("energy_j")
        rows.append((
            e["target"], e.get("kind", "-"), e.get("status", "estimated"),
            _num(e["estimated_ms"]), _num(e["bound_ms"]), e.get("bound", "-"),
            _num(e.get("throughput_per_s")), _fit(e.get("memory")),
            _energy(energy, e.get("energy_basis", "")),
            _gains(e), _top_op(e)))
    m = measured_row(d)
    if m:
        sp = d.get("speedup", {}).get("optimized_vs_original")
        rows.append((
            "here (cpu)", "host", "measured",
            _num(m["median_ms"]), "-", "-",
            _num(1e3 / m["median_ms"]) if m.get("median_ms") else "-", "-", "-",
            f"{_num(sp)}x vs original (measured, same run)" if sp else "-", "-"))
    return rows


def target_notes(d: dict) -> list[str]:
    """What the per-target numbers are: the status legend, energy bases, who estimated each
    target (calibration), and the cost model's notes."""
    ests = d.get("estimates") or []
    if not ests:
        return []
    out = [f"status: {STATUS_LEGEND}."]
    bases: dict[str, list[str]] = {}
    for e in ests:
        bases.setdefault(e.get("energy_basis", "not given"), []).append(e["target"])
    out.append("energy J: " + "; ".join(f"{', '.join(t)}: {b}" for b, t in bases.items()) +
               " ('<=' marks an upper bound).")
    m = measured_row(d)
    if m:
        out.append(f"here (cpu): measured on {m.get('machine', 'this machine')}, "
                   f"{m.get('runs', '?')} interleaved runs.")
    for e in ests:
        desc = ", ".join(x for x in (e.get("description"), e.get("provenance")) if x)
        desc = f" ({desc})" if desc else ""
        out.append(f"{e['target']}{desc}: estimated by {e.get('by', '?')}.")
        out += [f"{e['target']}: {n}" for n in e.get("notes", [])]
    return out


COMPACT_COLUMNS = ("target", "status", "latency ms", "bound ms", "bound kind", "memory fit",
                   "per-pass gains")


def compare_targets_table(report: dict, width: int | None = None) -> Table:
    """A rich table, one row per estimated target (plus the measured row, when there is one).
    Below 150 columns of terminal it keeps the essential columns only."""
    cols = TARGET_COLUMNS if (width or 200) >= 150 else COMPACT_COLUMNS
    keep = [TARGET_COLUMNS.index(c) for c in cols]
    t = Table(title="targets (estimated unless marked measured)", title_justify="left",
              caption=STATUS_LEGEND, caption_justify="left")
    for c in cols:  # short cells stay whole; long ones wrap at spaces or fold
        t.add_column(c, style="bold" if c == "target" else None,
                     no_wrap=c in ("kind", "status", "bound kind", "throughput/s", "target"),
                     overflow="fold", min_width=7 if c.endswith(" ms") else None)
    for row in target_rows(report):
        t.add_row(*(row[i] for i in keep))
    return t


def _md_cell(x: str) -> str:
    return x.replace("|", "\\|")


def compare_targets_markdown(report: dict) -> str:
    rows = target_rows(report)
    if not rows:
        return "(no per-target estimates in this report)\n"
    lines = ["| " + " | ".join(TARGET_COLUMNS) + " |", "|" + "---|" * len(TARGET_COLUMNS)]
    lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
    notes = target_notes(report)
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def to_rich(d: dict, width: int | None = None) -> Group:
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
    parts: list[Any] = [t, p]
    if d.get("estimates"):
        parts.append(compare_targets_table(d, width))
        parts += [Text(f"  - {n}", style="dim") for n in target_notes(d)[1:]]
    if d.get("advice"):
        parts.append(Text("advice", style="bold"))
        parts += [Text(f"  - {a}") for a in d["advice"]]
    return Group(*parts)


def print_report(d: dict, console: Console | None = None) -> None:
    console = console or Console()
    console.print(to_rich(d, console.width))


def to_markdown(d: dict) -> str:
    lines = ["# optim report", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {_md_cell(v)} |" for k, v in summary_rows(d)]
    lines += ["", "## Passes", "", "| pass | what changed | skipped | fidelity after | time |",
              "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in pass_rows(d)]
    if d.get("estimates"):
        lines += ["", "## Targets (estimated latency and roofline bound)", "",
                  compare_targets_markdown(d).rstrip("\n")]
    if d.get("advice"):
        lines += ["", "## Advice", ""] + [f"- {a}" for a in d["advice"]]
    return "\n".join(lines) + "\n"


def _img(png: bytes, alt: str) -> str:
    return (f'<img src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}" '
            f'alt="{html.escape(alt)}" style="max-width:100%">')


def _html_table(head: tuple[str, ...], rows: list[tuple]) -> str:
    esc = html.escape
    cells = "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return "<table><tr>" + "".join(f"<th>{esc(c)}</th>" for c in head) + f"</tr>{cells}</table>"


# per-layer and per-width records passes leave in their details, shown as tables
_DETAIL_TABLES = ("layers", "widths", "blocks")


def _scalar_cell(v: Any) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k} {_scalar_cell(x)}" for k, x in v.items())
    if isinstance(v, list):
        return "/".join(_scalar_cell(x) for x in v)
    return _fmt(v) if isinstance(v, float) else str(v)


def pass_detail_tables(d: dict) -> list[tuple[str, tuple[str, ...], list[tuple]]]:
    """(title, header, rows) for every list of records in a pass's details."""
    out = []
    for p in d["passes"]:
        for key in _DETAIL_TABLES:
            recs = p.get("details", {}).get(key)
            if not (isinstance(recs, list) and recs and all(isinstance(r, dict) for r in recs)):
                continue
            head = tuple(dict.fromkeys(k for r in recs for k in r))
            out.append((f"{p['name']}: {key}", head,
                        [tuple(_scalar_cell(r.get(k, "")) for k in head) for r in recs]))
    return out


def _target_details(e: dict) -> str:
    """Collapsible per-target breakdown: stages, time by bound and kind, bytes, top kernels."""
    est = lambda v: f"{_num(v)} (estimated)"  # noqa: E731
    stages = [(s["after"], est(s["estimated_ms"]), f"{_num(s.get('bound_ms'))} (bound)",
               _num(s.get("gain_vs_previous"))) for s in e.get("stages", [])]
    kernels = [(k.get("module") or "", k.get("name", ""), k.get("kind", ""),
                f"{k.get('dtype', '')} / {k.get('peak_dtype', '')}", k.get("shape", ""),
                est(k.get("seconds", 0) * 1e3), k.get("bound", ""), k.get("note") or "")
               for k in e.get("top_kernels", [])]
    parts = [
        _html_table(("after", "latency ms", "bound ms", "gain vs previous"), stages),
        _html_table(("bound", "time ms"), [(k, est(v)) for k, v in
                                          e.get("time_by_bound_ms", {}).items()]),
        _html_table(("kernel kind", "time ms"), [(k, est(v)) for k, v in
                                                e.get("time_by_kind_ms", {}).items()]),
        _html_table(("bytes class", "bytes moved"), [(k, _bytes(v)) for k, v in
                                                    e.get("bytes_by_class", {}).items()]),
        _html_table(("module", "kernel", "kind", "dtype / peak", "shape", "latency ms", "bound",
                     "note"), kernels)]
    return (f"<details><summary>{html.escape(e['target'])}: stages, time breakdown, top kernels"
            f"</summary>{''.join(parts)}</details>")


def _targets_html(d: dict, plots: bool, rooflines: dict[str, bytes] | None) -> str:
    esc = html.escape
    ests = d.get("estimates") or []
    if not ests:
        return ""
    out = ["<h2>Targets</h2>" + _html_table(TARGET_COLUMNS, target_rows(d))]
    notes = target_notes(d)
    if notes:
        out.append("<ul>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>")
    if plots:
        try:
            out.append("<h3>Estimated latency after each stage</h3>" +
                       _img(stage_bars_png(ests), "estimated latency after each pipeline stage"))
        except (ImportError, ValueError) as ex:  # a missing plot must not lose the report
            out.append(f"<p>(stage chart not drawn: {esc(str(ex))})</p>")
    if plots and rooflines:
        out.append("<h3>Rooflines (ceilings: bound; kernels: estimated)</h3>")
        out += [f"<figure>{_img(png, f'roofline {name}')}<figcaption>{esc(name)}</figcaption>"
                f"</figure>" for name, png in rooflines.items()]
    out += [_target_details(e) for e in ests]
    return "\n".join(out)


def to_html(d: dict, plots: bool = True, rooflines: dict[str, bytes] | None = None) -> str:
    """The report as one self-contained HTML page. With `plots`, a stage bar chart drawn from
    `estimates` and the given pre-rendered `rooflines` (target name -> PNG bytes) are embedded."""
    esc = html.escape
    summary = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>"
                      for k, v in summary_rows(d))
    passes = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>"
                     for r in pass_rows(d))
    ops = "".join(f"<tr><td>{esc(k)}</td><td>{d['graph']['before'].get(k, 0)}</td>"
                  f"<td>{d['graph']['after'].get(k, 0)}</td></tr>"
                  for k in sorted(set(d["graph"]["before"]) | set(d["graph"]["after"])))
    skipped = "".join(f"<tr><td>{esc(p['name'])}</td><td>{esc(s['where'])}</td>"
                      f"<td>{esc(s['reason'])}</td></tr>"
                      for p in d["passes"] for s in p["skipped"])
    targets = _targets_html(d, plots, rooflines)
    tables = "".join(f"<details><summary>{esc(t)}</summary>{_html_table(h, r)}</details>"
                     for t, h, r in pass_detail_tables(d))
    if tables:
        tables = f"<h2>Per layer</h2>{tables}"
    advice = ("<h2>Advice</h2><ul>" + "".join(f"<li>{esc(a)}</li>" for a in d["advice"]) +
              "</ul>") if d.get("advice") else ""
    return ('<!doctype html><html><head><meta charset="utf-8"><title>optim report</title>\n'
            "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:80em}\n"
            "table{border-collapse:collapse;margin:1em 0}"
            "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}\n"
            "th{background:#f4f4f4}"
            "details table{display:inline-table;margin-right:1em;vertical-align:top}</style>"
            "</head><body>\n"
            f"<h1>optim report: {esc(d['model']['name'])} on {esc(d['target']['name'])}</h1>\n"
            f"<table>{summary}</table>\n"
            "<h2>Passes</h2><table><tr><th>pass</th><th>what changed</th><th>skipped</th>"
            f"<th>fidelity after</th><th>time</th></tr>{passes}</table>\n"
            f"{tables}\n"
            f"{targets}\n"
            f"{advice}\n"
            "<h2>Skipped matches</h2><table><tr><th>pass</th><th>where</th><th>reason</th></tr>"
            f"{skipped or '<tr><td colspan=3>none</td></tr>'}</table>\n"
            "<h2>Graph ops before / after</h2>"
            f"<table><tr><th>op</th><th>before</th><th>after</th></tr>{ops}</table>\n"
            "<p>Every latency is labelled measured (here, interleaved runs), estimated (by what) "
            "or bound (datasheet roofline, a lower bound). "
            f"Generated {esc(d['created'])} by optim {esc(d.get('optim_version', ''))}.</p>\n"
            "</body></html>")


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
            except (KeyError, TypeError, IndexError, StopIteration):
                vals.append("-")
        t.add_row(label, *vals)
    row("model", lambda d: d["model"]["name"])
    row("target", lambda d: d["target"]["name"])
    row("backend", lambda d: d["backend"]["name"])
    row("passes", lambda d: ", ".join(p["name"] for p in d["passes"]))
    row("original latency",
        lambda d: _ms(next(r for r in d["latency"] if r["label"] == "original")))
    row("optimized latency",
        lambda d: _ms(next(r for r in d["latency"] if r["label"] == "optimized")))
    row("speedup (same run)", lambda d: f"{d['speedup']['optimized_vs_original']:.2f}x measured")
    row("estimated on target", lambda d: f"{_num(d['estimates'][0]['estimated_ms'])} ms estimated "
                                         f"({d['estimates'][0]['target']})")
    row("roofline bound on target", lambda d: f"{_num(d['estimates'][0]['bound_ms'])} ms bound "
                                              f"({d['estimates'][0]['target']})")
    row("cosine min", lambda d: _fmt(d["fidelity"]["outputs"]["cosine_min"], 6))
    row("SQNR dB", lambda d: _fmt(d["fidelity"]["outputs"]["sqnr_db"], 3))
    keys = sorted({k for _, d in reports for k in d["fidelity"].get("task", {})})
    for k in keys:
        row(f"task {k}", lambda d, k=k: _fmt(d["fidelity"]["task"][k], 5))
    row("weights MiB", lambda d: f"{d['model'].get('weight_bytes_after', 0) / 2**20:.1f}")
    return t
