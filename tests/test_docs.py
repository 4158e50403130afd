"""The documentation: the strict MkDocs build and the Python examples of docs/*.md.

Each page's ```python blocks run in order in one namespace (a page reads as one session), so
an example that stops matching the library fails here. A block preceded by the line
``<!-- docs-test: skip -->`` is not run (for one that takes minutes or needs a data set).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import json
import linecache
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SKIP = "<!-- docs-test: skip -->"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(text: str) -> list[str]:
    """The ```python blocks of a Markdown page, less those marked ``SKIP`` on the line before."""
    blocks = []
    for m in BLOCK.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        if before.strip() != SKIP:
            blocks.append(m.group(1))
    return blocks


PAGES = sorted(p for p in DOCS.rglob("*.md") if python_blocks(p.read_text()))


def test_block_extraction_honours_the_skip_marker():
    page = f"a\n```python\nx = 1\n```\n{SKIP}\n```python\nraise SystemExit\n```\n```bash\nls\n```\n"
    assert python_blocks(page) == ["x = 1\n"]


def test_pages_with_examples_exist():
    # the concepts and how-to pages carry runnable examples; an empty list would test nothing
    assert {p.name for p in PAGES} >= {"concepts.md", "how-to.md"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an example that writes files writes them here
    namespace: dict = {"__name__": "__docs__"}
    for i, block in enumerate(python_blocks(page.read_text())):
        name = f"{page.name}[block {i + 1}]"
        # so that a failing example's traceback shows its lines
        linecache.cache[name] = (len(block), None, block.splitlines(True), name)
        code = compile(block, name, "exec")
        exec(code, namespace)


def test_every_module_has_an_api_section():
    # the API reference lists modules explicitly (no generator plugin): a new module must get a
    # `::: deepufm.x.y` line in docs/api/, or its public names would be missing from the site
    documented = set(re.findall(r"^::: (deepufm[\w.]*)", _api_text(), re.M))
    modules = set()
    for path in (ROOT / "src" / "deepufm").rglob("*.py"):
        parts = path.relative_to(ROOT / "src").with_suffix("").parts
        modules.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    assert modules - documented == set()


def _api_text() -> str:
    return "\n".join(p.read_text() for p in (DOCS / "api").glob("*.md"))


# -- every public name has a docstring of its own --------------------------------------------------
# Every module of the package (issue 14: a docstring of its own, not inherited or generated).
DOCSTRING_SCOPE = ("deepufm",)


def _generated_doc(cls: type) -> bool:
    """Whether ``cls.__doc__`` is the one ``dataclass`` or ``namedtuple`` writes when none is given
    (``"Name(a: int, b: str = '')"``, ``"Name(a, b)"``): not a docstring of its own."""
    doc = cls.__dict__.get("__doc__") or ""
    if dataclasses.is_dataclass(cls):
        try:
            signature = str(inspect.signature(cls)).replace(" -> None", "")
        except (TypeError, ValueError):
            return False
        return doc == cls.__name__ + signature
    fields = cls.__dict__.get("_fields")
    return isinstance(fields, tuple) and doc == f"{cls.__name__}({', '.join(fields)})"


def _own_doc(obj: object) -> bool:
    # a class's __doc__ would be inherited from its bases when it has none: read its own __dict__
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
    return bool((doc or "").strip()) and not (inspect.isclass(obj) and _generated_doc(obj))


def missing_docstrings(modules: list[types.ModuleType]) -> list[str]:
    """Public modules, functions, classes and methods (``property`` getters, class and static
    methods included) of ``modules`` that have no docstring of their own: their dotted names.
    Names imported from elsewhere are checked where they are defined."""
    missing = []
    for mod in modules:
        if not (mod.__doc__ or "").strip():
            missing.append(mod.__name__)
        for name, obj in vars(mod).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            if not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            if not _own_doc(obj):
                missing.append(f"{mod.__name__}.{name}")
            if not inspect.isclass(obj):
                continue
            for attr, value in vars(obj).items():
                if attr.startswith("_"):
                    continue
                if isinstance(value, property):
                    value = value.fget
                elif isinstance(value, functools.cached_property):
                    value = value.func
                func = getattr(value, "__func__", value)  # classmethod, staticmethod
                if inspect.isfunction(func) and not (func.__doc__ or "").strip():
                    missing.append(f"{mod.__name__}.{name}.{attr}")
    return missing


def _public_modules(scope: tuple[str, ...]) -> list[types.ModuleType]:
    import deepufm

    def in_scope(name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in scope)

    found = pkgutil.walk_packages(deepufm.__path__, "deepufm.")
    names = [m.name for m in found if not any(p.startswith("_") for p in m.name.split("."))]
    # the package itself (deepufm/__init__.py) is always checked
    return [deepufm] + [importlib.import_module(n) for n in names if in_scope(n)]


def test_missing_docstrings_finds_every_kind_of_name():
    # a synthetic module: one documented and one undocumented name of every kind the rule covers
    mod = types.ModuleType("fake", "A module.")

    def documented():
        """Has one."""

    def bare():
        pass

    @dataclasses.dataclass
    class Record:
        a: int
        b: str = ""

    @dataclasses.dataclass
    class Described:
        """Has one."""

        a: int

    class Operator:
        """Has one."""

        def plain(self):
            pass

        @property
        def size(self):
            pass

        @functools.cached_property
        def cached(self):
            pass

        @classmethod
        def build(cls):
            pass

        @staticmethod
        def helper():
            pass

        def _private(self):
            pass

        def kept(self):
            """Has one."""

    class Child(Operator):  # inherits Operator's docstring: not its own
        pass

    Pair = __import__("collections").namedtuple("Pair", "x y")
    for obj in (documented, bare, Record, Described, Operator, Child, Pair):
        obj.__module__ = "fake"
        setattr(mod, obj.__name__, obj)
    mod.imported = inspect.getdoc  # defined elsewhere: not this module's to document
    mod._hidden = bare
    assert missing_docstrings([mod]) == [
        "fake.bare",
        "fake.Record",
        "fake.Operator.plain",
        "fake.Operator.size",
        "fake.Operator.cached",
        "fake.Operator.build",
        "fake.Operator.helper",
        "fake.Child",
        "fake.Pair",
    ]
    assert missing_docstrings([types.ModuleType("empty")]) == ["empty"]


def test_every_public_name_has_its_own_docstring():
    modules = _public_modules(DOCSTRING_SCOPE)
    # the scope reaches every listed package (a typo would silently check nothing)
    assert all(any(m.__name__.startswith(p) for m in modules) for p in DOCSTRING_SCOPE)
    assert missing_docstrings(modules) == []


def test_readme_points_only_inside_the_repository():
    readme = (ROOT / "README.md").read_text()
    assert "shared folder" not in readme and "THEORY.md" not in readme
    assert "mkdocs build" in readme and "docs/concepts.md" in readme


# -- user-facing text cites what a user has: the Concepts page or the paper ------------------------
# The project's internal specification (THEORY.md) is not part of the repository, so no file a user
# reads may cite it. Scanned: the package, the README, the examples and the benchmarks.
CITATION_SCOPE = ("src", "README.md", "examples", "benchmarks")
CITATION_EXCLUDED: tuple[str, ...] = ()


def specification_citations(
    root: Path, scope: tuple[str, ...], excluded: tuple[str, ...]
) -> list[str]:
    """``"path:line"`` of every line under ``root``'s ``scope`` (files or folders) that contains
    "THEORY", except in files under ``excluded``; caches and non-text files are skipped."""
    found = []
    for entry in scope:
        base = root / entry
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        for path in files:
            rel = path.relative_to(root).as_posix()
            if "__pycache__" in rel or any(rel == e or rel.startswith(e + "/") for e in excluded):
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue
            found += [
                f"{rel}:{i}" for i, line in enumerate(text.splitlines(), 1) if "THEORY" in line
            ]
    return found


def test_specification_citations_finds_an_added_one(tmp_path):
    (tmp_path / "src" / "pkg" / "skip").mkdir(parents=True)
    (tmp_path / "src" / "pkg" / "a.py").write_text('"""Fine."""\nx = 1  # THEORY §6\n')
    (tmp_path / "src" / "pkg" / "skip" / "b.py").write_text("# THEORY §7\n")
    (tmp_path / "src" / "pkg" / "skipped.py").write_text("# THEORY §8\n")  # not under skip/
    (tmp_path / "README.md").write_text("see THEORY M3\n")
    found = specification_citations(tmp_path, ("src", "README.md", "examples"), ("src/pkg/skip",))
    assert found == ["src/pkg/a.py:2", "src/pkg/skipped.py:1", "README.md:1"]


def test_user_facing_text_does_not_cite_the_internal_specification():
    assert specification_citations(ROOT, CITATION_SCOPE, CITATION_EXCLUDED) == []


def test_strict_build(tmp_path):
    if shutil.which("mkdocs") is None:
        pytest.skip('mkdocs is not installed: pip install ".[docs]" to build the documentation')
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    # griffe reads the sources statically from mkdocs.yml's `paths: [src]`: nothing is imported
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    site = tmp_path / "site"
    concepts = (site / "concepts" / "index.html").read_text()
    assert "Papyan" in concepts and "2404.06106" in concepts
    # mkdocstrings rendered the reference: a function's heading and its docstring
    # the hook rewrote every specification reference and Sphinx role of the docstrings
    pages = "".join(p.read_text() for p in site.rglob("*.html"))
    assert "THEORY" not in pages and ":func:" not in pages
    matrices = (site / "api" / "matrices" / "index.html").read_text()
    assert 'id="deepufm.matrices.spectra.numerical_rank"' in matrices
    assert "numerical-zero threshold" in matrices


# -- the gallery page: the registry's figures and tables, by experiment, with the quick-run images ---
GALLERY = DOCS / "gallery.md"


@functools.cache
def make_gallery() -> types.ModuleType:
    """docs/make_gallery.py, imported from its file (docs/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_gallery", DOCS / "make_gallery.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gallery_matches_the_registry():
    expected = make_gallery().gallery_page()
    assert GALLERY.read_text() == expected, "regenerate it: python docs/make_gallery.py"


def _fake_run(run_dir: Path, widths: dict[str, int]) -> None:
    """A finished quick linear-ufm run as far as the gallery reads it: manifest, report.md and one
    PNG per figure (``widths``: id -> pixel width, height half of it; a red left half)."""
    from PIL import Image

    (run_dir / "figures").mkdir(parents=True)
    manifest = {"kind": "experiment", "name": "linear-ufm/quick", "status": "complete"}
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    report = ["# linear-ufm", "", "summary", "", "## Figures", ""]
    for fid, width in widths.items():
        img = Image.new("RGB", (width, width // 2), "white")
        img.paste((255, 0, 0), (0, 0, width // 2, width // 2))
        img.save(run_dir / "figures" / f"{fid}.png")
        # a caption as the experiments write them: plain text with Markdown's special characters
        caption = f"Top K^2 outliers of G_within at Lambda_l * 2 [{fid}]\nsecond line"
        report += [f"### {fid}", "", caption, "", f"![{fid}](figures/{fid}.png)", ""]
    (run_dir / "report.md").write_text("\n".join(report))


def test_make_gallery_copies_and_shrinks_the_figures_of_a_run(tmp_path):
    from PIL import Image

    gallery = make_gallery()
    runs = tmp_path / "runs"  # a `deepufm run all` directory holding one experiment
    _fake_run(runs / "linear-ufm", {"v1-fig3": 1800, "v1-fig4": 400})
    out = tmp_path / "gallery"
    assert gallery.collect([runs], out) == {"linear-ufm": ["v1-fig3", "v1-fig4"]}
    with Image.open(out / "linear-ufm" / "v1-fig3.png") as big:
        # at most MAX_WIDTH wide, the aspect kept, the picture itself kept (red left, white right)
        assert big.size == (900, 450)
        rgb = big.convert("RGB")
        assert rgb.getpixel((100, 200)) == (255, 0, 0) and rgb.getpixel((800, 200)) == (255,) * 3
    with Image.open(out / "linear-ufm" / "v1-fig4.png") as small:
        assert small.size == (400, 200)  # never enlarged
    record = json.loads((out / "linear-ufm" / "captions.json").read_text())
    assert record["experiment"] == "linear-ufm" and record["preset"] == "quick"
    # the caption's two lines are joined
    assert record["captions"]["v1-fig3"] == (
        "Top K^2 outliers of G_within at Lambda_l * 2 [v1-fig3] second line"
    )

    page = gallery.gallery_page(out)
    assert "![v1-fig3](gallery/linear-ufm/v1-fig3.png)" in page
    assert "![v1-fig4](gallery/linear-ufm/v1-fig4.png)" in page
    # Markdown's special characters of the caption are escaped, the command is given
    assert "G\\_within at Lambda\\_l \\* 2 \\[v1-fig3\\]" in page
    assert "`deepufm run linear-ufm --preset quick` → `figures/v1-fig3.png`" in page
    # experiments without images keep their table only
    assert "gallery/relu-ufm" not in page and "| `v1-fig9` |" in page

    # a second collection replaces the experiment's images: a figure gone from the run goes
    (runs / "linear-ufm" / "figures" / "v1-fig4.png").unlink()
    report = runs / "linear-ufm" / "report.md"
    report.write_text(report.read_text().split("### v1-fig4")[0])
    assert gallery.collect([runs / "linear-ufm"], out) == {"linear-ufm": ["v1-fig3"]}
    assert sorted(p.name for p in (out / "linear-ufm").glob("*.png")) == ["v1-fig3.png"]

    with pytest.raises(FileNotFoundError, match="no finished experiment run"):
        gallery.collect([tmp_path / "gallery"], tmp_path / "other")


@pytest.mark.skipif(
    not (DOCS / "gallery").is_dir(),
    reason="docs/gallery/ is not generated yet: deepufm run all --preset quick --out runs/gallery; "
    "deepufm run mnist-resnet --preset quick --out runs/gallery-mnist; "
    "python docs/make_gallery.py runs/gallery runs/gallery-mnist",
)
def test_gallery_has_every_figure_of_the_quick_experiments():
    from deepufm.experiments.registry import EXPERIMENTS

    gallery = make_gallery()
    page = GALLERY.read_text()
    missing = []
    for name in gallery.SOURCES:
        for item in EXPERIMENTS[name].items:
            if "table" in item.id:  # a table has no image
                continue
            src = f"gallery/{name}/{item.id}.png"
            if not (DOCS / src).is_file() or f"]({src})" not in page:
                missing.append(src)
    assert missing == []
    total = sum(p.stat().st_size for p in (DOCS / "gallery").rglob("*.png"))
    assert total < 8e6, f"the committed images take {total / 1e6:.1f} MB"


def test_hook_rewrites_roles_and_specification_references():
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)

    class Page:
        url = "api/matrices/"

    html = "the optimum (THEORY §4.2, M3); :class:<code>~torch.nn.Linear</code>; THEORY says"
    out = hooks.on_page_content(html, Page(), None, None)
    assert out == (
        'the optimum (see <a href="../../concepts/#deep-neural-collapse">deep neural collapse</a>, '
        '<a href="../../concepts/#the-curvature-matrices">the matrices</a>); '
        "<code>torch.nn.Linear</code>; the paper says"
    )
