"""Structural checks of the reports the experiments write, independent of the renderers: every
table row has its header's cell count, every image is embedded, nothing is fetched from outside."""

import re
from html.parser import HTMLParser
from pathlib import Path

# A cell boundary is a pipe not escaped by a backslash (GitHub-Markdown tables).
_PIPE = re.compile(r"(?<!\\)\|")


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Every table of a Markdown text as rows of cells (header first, separator dropped),
    unescaped; asserts that every row has the header's cell count."""
    tables, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append(line)
            continue
        if block:
            rows = [[c.strip().replace("\\|", "|") for c in _PIPE.split(r)[1:-1]] for r in block]
            assert len(rows) >= 2 and all(set(c) <= set("-:") for c in rows[1]), block[:2]
            assert all(len(r) == len(rows[0]) for r in rows), [
                (len(r), r) for r in rows if len(r) != len(rows[0])
            ]
            tables.append([rows[0], *rows[2:]])
            block = []
    return tables


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self.external: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("src", "href"):
            if re.match(r"\s*(https?:)?//", attrs.get(key) or ""):
                self.external.append(f"<{tag} {key}={attrs[key]}>")
        if tag == "link" or (tag == "script" and "src" in attrs):
            self.external.append(f"<{tag}>")
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(attrs.get("src", ""))
        elif tag == "a":
            self.links.append(attrs.get("href", ""))

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None


def html_page(path: Path) -> _Page:
    """A parsed self-contained page: asserts that every table row has its header's cell count,
    every image is a data: URI and nothing external is referenced."""
    page = _Page()
    page.feed(Path(path).read_text())
    for table in page.tables:
        assert all(len(r) == len(table[0]) for r in table), [len(r) for r in table]
    assert all(src.startswith("data:image/png;base64,") for src in page.images), page.images
    assert not page.external, page.external
    return page


def check_report(out: Path) -> tuple[list[list[list[str]]], _Page]:
    """Checks ``report.md``, ``tables/*.md`` and ``report.html`` of a run directory; returns the
    Markdown tables of ``report.md`` and the parsed HTML page. The HTML holds the same tables with
    the same cells, and every figure of ``report.md`` embedded."""
    out = Path(out)
    report = (out / "report.md").read_text()
    md = markdown_tables(report)
    for table in sorted((out / "tables").glob("*.md")) if (out / "tables").is_dir() else []:
        (single,) = markdown_tables(table.read_text())
        assert single in md, table.name  # the report shows the table file's exact cells
    page = html_page(out / "report.html")
    assert [[[c.replace("**", "") for c in r] for r in t] for t in md] == page.tables
    figures = re.findall(r"^!\[", report, flags=re.M)
    assert len(page.images) == len(figures) > 0
    return md, page


DEPARTURES_HEADER = ["setting", "this run", "paper", "paper's value is", "departure"]


def check_departures(out: Path, expected: dict[str, tuple[str, str]]) -> dict[str, list[str]]:
    """The report's "Departures from the paper" table: present once, every departure verdict one
    of the four, and ``expected[setting] == (this run, paper)`` for the settings given (the
    caller takes them from the run's ``results.json`` config and the paper's text). Returns the
    rows by setting."""
    tables = markdown_tables((Path(out) / "report.md").read_text())
    (table,) = [t for t in tables if t[0] == DEPARTURES_HEADER]
    rows = {r[0]: r for r in table[1:]}
    verdicts = {"yes", "no", "yes (from the provisional value)", "unknown (not stated)"}
    assert all(r[4] in verdicts for r in rows.values()), rows
    for setting, (here, paper) in expected.items():
        assert rows[setting][1:3] == [here, paper], (setting, rows[setting])
        if paper == "not stated":
            assert rows[setting][4] == "unknown (not stated)"
        else:
            assert (rows[setting][4] == "no") == (here == paper), rows[setting]
    return rows
