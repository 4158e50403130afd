"""``report.md`` and a self-contained ``report.html`` (figures embedded) for one experiment."""

from __future__ import annotations

import base64
import csv
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from deepufm.experiments.results import Result
from deepufm.training.rundir import write_text


@dataclass
class Report:
    title: str
    summary: str
    figures: list[tuple[str, str, Path]] = field(default_factory=list)  # (id, caption, png path)
    tables: list[tuple[str, str]] = field(default_factory=list)  # (caption, markdown table)
    notes: list[str] = field(default_factory=list)
    results: list[Result] = field(default_factory=list)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    fmt = lambda v: f"{v:.6g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_table(
    out_dir: Path, name: str, header: Sequence[str], rows: Sequence[Sequence[object]]
) -> str:
    """Write a paper table as ``tables/<name>.md`` and ``tables/<name>.csv`` (full precision);
    returns the Markdown for the report. Both are written atomically (a rerun's stale tables
    are removed by the run directory's manifest, :func:`deepufm.training.manifest.finish`)."""
    table_dir = Path(out_dir) / "tables"
    table_dir.mkdir(parents=True, exist_ok=True)
    md = markdown_table(header, rows)
    write_text(table_dir / f"{name}.md", md + "\n")
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows([[repr(v) if isinstance(v, float) else v for v in row] for row in rows])
    write_text(table_dir / f"{name}.csv", buf.getvalue())
    return md


def results_table(results: Sequence[Result]) -> str:
    header = [
        "quantity",
        "theorem",
        "layer",
        "predicted",
        "measured",
        "rel. error",
        "tolerance",
        "holds",
    ]
    rows = [
        [
            r.quantity,
            r.theorem,
            "—" if r.layer is None else r.layer,
            r.predicted,
            r.measured,
            f"{r.rel_error:.2e}",
            f"{r.tolerance:.0e}",
            "yes" if r.holds else "**no**",
        ]
        for r in results
    ]
    if any(r.note for r in results):
        # Say why a prediction does not apply (ReLU layers off the Definition-2 point).
        header.append("note")
        for row, r in zip(rows, results):
            row.append(r.note)
    return markdown_table(header, rows)


def write_report(out_dir: Path, report: Report) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` into ``out_dir``."""
    out_dir = Path(out_dir)
    held = sum(r.holds for r in report.results)
    md = [f"# {report.title}", "", report.summary, ""]
    if report.results:
        md += [
            f"## Theory vs measurement ({held}/{len(report.results)} hold)",
            "",
            results_table(report.results),
            "",
        ]
    for caption, table in report.tables:
        md += [f"## {caption}", "", table, ""]
    if report.notes:
        md += ["## Notes", ""] + [f"- {n}" for n in report.notes] + [""]
    if report.figures:
        md += ["## Figures", ""]
        for fid, caption, png in report.figures:
            md += [
                f"### {fid}",
                "",
                caption,
                "",
                f"![{fid}]({png.relative_to(out_dir).as_posix()})",
                "",
            ]
    write_text(out_dir / "report.md", "\n".join(md))
    write_text(out_dir / "report.html", _html(out_dir, report, held))
    return out_dir / "report.md", out_dir / "report.html"


def _md_table_to_html(table: str) -> str:
    lines = [line.strip().strip("|").split("|") for line in table.splitlines() if line.strip()]
    head, body = lines[0], lines[2:]
    cell = lambda tag, v: f"<{tag}>{html.escape(v.strip()).replace('**', '')}</{tag}>"  # noqa: E731
    rows = ["<tr>" + "".join(cell("th", v) for v in head) + "</tr>"]
    for row in body:
        cls = ' class="fail"' if any("**no**" in v for v in row) else ""
        rows.append(f"<tr{cls}>" + "".join(cell("td", v) for v in row) + "</tr>")
    return "<table>" + "".join(rows) + "</table>"


def _html(out_dir: Path, report: Report, held: int) -> str:
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(report.title)}</title><style>",
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}",
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}",
        "tr.fail{background:#fdd}img{max-width:100%}</style></head><body>",
        f"<h1>{html.escape(report.title)}</h1><p>{html.escape(report.summary)}</p>",
    ]
    if report.results:
        parts.append(f"<h2>Theory vs measurement ({held}/{len(report.results)} hold)</h2>")
        parts.append(_md_table_to_html(results_table(report.results)))
    for caption, table in report.tables:
        parts.append(f"<h2>{html.escape(caption)}</h2>{_md_table_to_html(table)}")
    if report.notes:
        parts.append(
            "<h2>Notes</h2><ul>"
            + "".join(f"<li>{html.escape(n)}</li>" for n in report.notes)
            + "</ul>"
        )
    for fid, caption, png in report.figures:
        data = base64.b64encode(Path(png).read_bytes()).decode()
        parts.append(
            f"<h3>{html.escape(fid)}</h3><p>{html.escape(caption)}</p>"
            f"<img alt='{html.escape(fid)}' src='data:image/png;base64,{data}'>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)
