"""The report renderers on hand-made tables: escaping, the HTML page, the index of `run all`."""

from dataclasses import replace

import pytest

from deepufm.cli import main
from deepufm.cli import run as run_cli
from deepufm.errors import DeepUFMError
from deepufm.experiments.report import Report, markdown_table, split_markdown_row, write_report
from deepufm.experiments.results import compare, read_results, write_results
from report_checks import html_page, markdown_tables


def test_cells_with_pipes_and_backslashes_keep_their_table_shape():
    header = ["max |off-diag|", "||H||_F", "a\\b"]
    rows = [["|x|", 0.5, "c\\|d"], ["two\nlines", 1e-20, ""]]
    md = markdown_table(header, rows)
    lines = md.splitlines()
    assert lines[0] == r"| max \|off-diag\| | \|\|H\|\|_F | a\\b |"
    assert split_markdown_row(lines[0]) == header
    assert split_markdown_row(lines[2]) == ["|x|", "0.5", "c\\|d"]
    assert split_markdown_row(lines[3]) == ["two lines", "1e-20", ""]
    (table,) = markdown_tables(md)
    assert [len(r) for r in table] == [3, 3, 3]
    with pytest.raises(ValueError, match="row 1 has 2 cells, its header 3"):
        markdown_table(header, [[1, 2, 3], [1, 2]])


def test_html_report_holds_the_escaped_tables_and_embeds_its_figures(tmp_path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1])
    (tmp_path / "figures").mkdir()
    png = tmp_path / "figures" / "f.png"
    fig.savefig(png)
    plt.close(fig)
    table = markdown_table(["quantity", "max |off-diag|"], [["||H||_F", 2.0]])
    report = Report(
        "t", "s", [("f", "caption", png)], [("c", table)], results=[compare("q", "T", 1, 2, 2, 0)]
    )
    write_report(tmp_path, report)
    page = html_page(tmp_path / "report.html")
    assert page.tables[1] == [["quantity", "max |off-diag|"], ["||H||_F", "2"]]
    assert len(page.tables[0]) == 2 and len(page.images) == 1
    text = (tmp_path / "report.html").read_text()
    assert "max-width:1100px" not in text and "img{max-width:100%;height:auto}" in text


def test_run_all_writes_a_self_contained_index_linking_every_report(tmp_path, monkeypatch, capsys):
    def fake(name, preset, out, **kwargs):
        out.mkdir(parents=True)
        held = name != "relu-ufm"
        results = [compare("q", "T", 1, 1.0, 1.0 + 0.5 * (not held), 0.1)]
        if name == "ce-ufm":
            results.append(replace(compare("r", "T", 1, 1.0, 2.0, 0.1), scope="out: why"))
        return Report(f"{name} title", "", results=results)

    monkeypatch.setattr(run_cli, "run_experiment", fake)
    assert main(["run", "all", "--out", str(tmp_path), "--quiet", "--jobs", "1"]) == 0
    page = html_page(tmp_path / "index.html")
    assert page.links == ["linear-ufm/report.html", "relu-ufm/report.html", "ce-ufm/report.html"]
    assert page.tables[0][1:] == [
        ["linear-ufm", "linear-ufm title", "1/1 predictions hold"],
        ["relu-ufm", "relu-ufm title", "0/1 predictions hold; missed: q (layer 1)"],
        [
            "ce-ufm",
            "ce-ufm title",
            "1/1 in-scope predictions hold; 1 out of scope (0 of them hold anyway)",
        ],
    ]
    assert "index.html" in capsys.readouterr().out


def test_errors_are_absolute_and_relative_and_a_zero_prediction_has_no_relative_error(tmp_path):
    a = compare("q", "T", 1, 4.0, 4.2, 0.06)
    assert a.abs_error == pytest.approx(0.2) and a.rel_error == pytest.approx(0.05) and a.holds
    z = compare("rank G_within", "T", 1, 0, 3, 0)  # the tolerance bounds the absolute error
    assert (z.abs_error, z.rel_error, z.holds) == (3.0, None, False)
    assert compare("q", "T", 1, 0.0, 1e-9, 1e-8).holds
    bad = compare("q", "T", None, 1.0, float("nan"), 1e9)
    assert bad.abs_error == float("inf") and not bad.holds
    path = tmp_path / "results.json"
    write_results(
        path, [a, z, bad], config={"experiment": "x", "layers": (1, 2)}, constants={"c": 0.5}
    )
    back = read_results(path)
    assert back.config == {"experiment": "x", "layers": [1, 2]} and back.constants == {"c": 0.5}
    assert back.results[:2] == [a, z]
    assert back.results[2].abs_error is None  # strict JSON: the undefined numbers are null
    path.write_text("[]")
    with pytest.raises(DeepUFMError, match="config, constants and results"):
        read_results(path)


def test_run_all_never_replaces_an_index_it_did_not_write(tmp_path, monkeypatch, capsys):
    calls = []

    def fake(name, preset, out, **kwargs):
        calls.append(name)
        out.mkdir(parents=True, exist_ok=True)
        return Report(f"{name} title", "", results=[compare("q", "T", 1, 1.0, 1.0, 0.1)])

    monkeypatch.setattr(run_cli, "run_experiment", fake)
    mine = tmp_path / "index.html"
    mine.write_text("<html>my notes</html>")
    assert main(["run", "all", "--out", str(tmp_path), "--quiet", "--jobs", "1"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"invalid --out='{tmp_path}'" in err and "was not written by deepufm" in err
    assert mine.read_text() == "<html>my notes</html>" and calls == []  # refused before any run
    other = tmp_path / "elsewhere.html"
    other.write_text("x")
    mine.unlink()
    mine.symlink_to(other)
    assert main(["run", "all", "--out", str(tmp_path), "--quiet", "--jobs", "1"]) == 2
    assert other.read_text() == "x" and calls == []
    mine.unlink()
    for _ in range(2):  # its own index is replaced on the next run
        assert main(["run", "all", "--out", str(tmp_path), "--quiet", "--jobs", "1"]) == 0
    assert html_page(mine).links[0] == "linear-ufm/report.html" and len(calls) == 6
