"""``report.md`` and a self-contained ``report.html`` (figures embedded) for one experiment."""

from __future__ import annotations

import base64
import csv
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from deepufm.errors import ConfigError
from deepufm.experiments.results import Result
from deepufm.training.rundir import write_text


@dataclass
class Report:
    """One experiment's report: title, summary, figures ``(id, caption, png)``, tables
    ``(caption, markdown)``, notes and the theory-vs-measurement rows."""

    title: str
    summary: str
    figures: list[tuple[str, str, Path]] = field(default_factory=list)  # (id, caption, png path)
    tables: list[tuple[str, str]] = field(default_factory=list)  # (caption, markdown table)
    notes: list[str] = field(default_factory=list)
    results: list[Result] = field(default_factory=list)

    @property
    def headline(self) -> str:
        """The one-line result: ``"17/17 predictions hold"``, with the rows outside the
        theorems' hypotheses counted apart (``"; 7 out of scope"``)."""
        return headline(self.results)


def headline(results: Sequence[Result]) -> str:
    """``"17/17 predictions hold"``; rows outside the theorems' hypotheses are counted apart
    (``"54/55 in-scope predictions hold; 17 out of scope (11 of them hold anyway)"``), and up to
    three in-scope misses are named (``"; missed: <quantity> (layer 2)"``)."""
    inside = [r for r in results if r.in_scope]
    held = f"{sum(r.holds for r in inside)}/{len(inside)}"
    if len(inside) == len(results):
        text = f"{held} predictions hold"
    else:
        out = [r for r in results if not r.in_scope]
        text = (
            f"{held} in-scope predictions hold; {len(out)} out of scope "
            f"({sum(r.holds for r in out)} of them hold anyway)"
        )
    missed = [r for r in inside if not r.holds]
    if 0 < len(missed) <= 3:
        text += "; missed: " + ", ".join(
            r.quantity + ("" if r.layer is None else f" (layer {r.layer})") for r in missed
        )
    return text


def markdown_cell(value: object) -> str:
    """One GitHub-Markdown table cell: floats to 6 significant digits; ``|`` and ``\\`` escaped
    (``max |off-diag|``, ``||H||_F`` would otherwise split the cell), line breaks as spaces."""
    text = f"{value:.6g}" if isinstance(value, float) else str(value)
    text = " ".join(text.splitlines())
    return text.replace("\\", "\\\\").replace("|", "\\|")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-Markdown table; every row must have the header's number of cells."""
    for i, row in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(f"table row {i} has {len(row)} cells, its header {len(header)}")
    line = lambda cells: "| " + " | ".join(markdown_cell(v) for v in cells) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "---|" * len(header), *(line(row) for row in rows)])


def split_markdown_row(line: str) -> list[str]:
    """The cells of one row written by :func:`markdown_table`, unescaped (its inverse)."""
    cells, cur, chars = [], [], iter(line.strip().removeprefix("|"))
    for ch in chars:
        if ch == "\\":
            cur.append(next(chars, ""))
        elif ch == "|":
            cells.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():  # a row without its closing pipe
        cells.append("".join(cur).strip())
    return cells


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
    """One row per record; a miss inside the theorem's hypotheses is marked ``**no**``, one
    outside them (``scope``) is reported as such and not as a miss."""
    header = [
        "quantity",
        "theorem",
        "layer",
        "predicted",
        "measured",
        "abs. error",
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
            f"{r.abs_error:.2e}",
            "—" if r.rel_error is None else f"{r.rel_error:.2e}",
            f"{r.tolerance:.0e}" + (" (abs.)" if r.rel_error is None else ""),
            ("yes" if r.holds else "**no**") if r.in_scope else ("yes" if r.holds else "no"),
        ]
        for r in results
    ]
    if any(not r.in_scope for r in results):
        header.append("scope")
        for row, r in zip(rows, results):
            row.append(r.scope)
    if any(r.note for r in results):
        header.append("note")
        for row, r in zip(rows, results):
            row.append(r.note)
    return markdown_table(header, rows)


def write_report(out_dir: Path, report: Report) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` into ``out_dir``."""
    out_dir = Path(out_dir)
    md = [f"# {report.title}", "", report.summary, ""]
    if report.results:
        md += [
            f"## Theory vs measurement ({report.headline})",
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
    write_text(out_dir / "report.html", _html(out_dir, report))
    return out_dir / "report.md", out_dir / "report.html"


def _md_table_to_html(table: str) -> str:
    lines = [split_markdown_row(line) for line in table.splitlines() if line.strip()]
    head, body = lines[0], lines[2:]
    cell = lambda tag, v: f"<{tag}>{html.escape(v).replace('**', '')}</{tag}>"  # noqa: E731
    rows = ["<tr>" + "".join(cell("th", v) for v in head) + "</tr>"]
    for row in body:
        cls = ' class="fail"' if any("**no**" in v for v in row) else ""
        rows.append(f"<tr{cls}>" + "".join(cell("td", v) for v in row) + "</tr>")
    return "<div class='table'><table>" + "".join(rows) + "</table></div>"


# Full width: a five-panel figure keeps its size until the window is narrower, then scales with
# it (never wider than drawn); wide tables scroll instead of squeezing the page.
STYLE = (
    "body{font-family:sans-serif;margin:1em 2em}"
    "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}"
    "div.table{overflow-x:auto}tr.fail{background:#fdd}img{max-width:100%;height:auto}"
)


def _html(out_dir: Path, report: Report) -> str:
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(report.title)}</title><style>",
        STYLE,
        "</style></head><body>",
        f"<h1>{html.escape(report.title)}</h1><p>{html.escape(report.summary)}</p>",
    ]
    if report.results:
        parts.append(f"<h2>Theory vs measurement ({html.escape(report.headline)})</h2>")
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


INDEX_TITLE = "<title>deepufm run all</title>"
"""What marks an ``index.html`` as written by :func:`write_index` (the ``run all`` directory has
no manifest of its own: its experiments each have theirs)."""


def check_index(out_dir: Path, param: str = "--out") -> None:
    """Refuse ``out_dir`` when it holds an ``index.html`` that deepufm did not write: the index
    would replace it, and files deepufm did not write are never replaced."""
    path = Path(out_dir) / "index.html"
    if not (path.exists() or path.is_symlink()):
        return
    ours = path.is_file() and not path.is_symlink()
    if ours:
        with path.open(encoding="utf-8", errors="replace") as f:
            ours = INDEX_TITLE in f.read(4096)
    if not ours:
        raise ConfigError(
            param,
            str(out_dir),
            "a directory without an index.html of its own (deepufm run all writes its index there)",
            f"{path} was not written by deepufm: move it or choose another {param}; files "
            "deepufm did not write are never replaced.",
        )


def write_index(out_dir: Path, entries: Sequence[tuple[str, Report]]) -> Path:
    """``index.html`` of a ``deepufm run all`` directory: for each ``(subdirectory, report)``
    a link to its ``report.html`` with the title and headline result. Self-contained like the
    reports (no stylesheet or script to fetch), written atomically; an ``index.html`` deepufm
    did not write is refused (:func:`check_index`), not replaced."""
    out_dir = Path(out_dir)
    check_index(out_dir)
    rows = "".join(
        f"<tr><td><a href='{html.escape(name, quote=True)}/report.html'>{html.escape(name)}</a>"
        f"</td><td>{html.escape(rep.title)}</td><td>{html.escape(rep.headline)}</td></tr>"
        for name, rep in entries
    )
    page = "\n".join(
        [
            "<!doctype html><html><head><meta charset='utf-8'>",
            f"{INDEX_TITLE}<style>{STYLE}</style></head><body>",
            "<h1>deepufm run all</h1><div class='table'><table>",
            f"<tr><th>experiment</th><th>report</th><th>result</th></tr>{rows}",
            "</table></div></body></html>",
        ]
    )
    write_text(out_dir / "index.html", page + "\n")
    return out_dir / "index.html"
