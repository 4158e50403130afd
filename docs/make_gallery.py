"""Build the documentation's gallery from finished quick runs: ``docs/gallery/`` and ``gallery.md``.

The gallery shows the figures each experiment draws. They come from real runs, so this script
runs nothing itself; it copies the figures of finished run directories::

    deepufm run all --preset quick --out runs/gallery
    deepufm run mnist-resnet --preset quick --out runs/gallery-mnist
    python docs/make_gallery.py runs/gallery runs/gallery-mnist

Each ``figures/<id>.png`` named in a run's ``report.md`` becomes
``docs/gallery/<experiment>/<id>.png`` (at most ``MAX_WIDTH`` pixels wide, palette-quantised and
optimised so that the committed images stay small), its caption goes to
``docs/gallery/<experiment>/captions.json``, and ``docs/gallery.md`` is rewritten. Without
arguments only ``gallery.md`` is rewritten, from the registry and the images already there.
``mkdocs build`` then needs no other step. The script is excluded from the site (``mkdocs.yml``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
GALLERY_DIR = DOCS / "gallery"
PAGE = DOCS / "gallery.md"
MAX_WIDTH = 900
# The experiments whose figures the gallery shows: those a quick run makes with no data set to
# fetch (`deepufm run all` and the embedded MNIST). The others are listed with their ids only.
SOURCES = ("linear-ufm", "relu-ufm", "ce-ufm", "mnist-resnet")
# "### v1-fig3\n\ncaption\n\n![v1-fig3](figures/v1-fig3.png)": the figures of write_report
FIGURE = re.compile(r"^### (\S+)\n\n(.*?)\n\n!\[[^\]]*\]\(([^)\s]+)\)", re.S | re.M)
# Markdown and MathJax would read these in a run's plain-text caption
ESCAPE = re.compile(r"([\\`*_\[\]])")


def report_figures(run_dir: Path) -> list[tuple[str, str, Path]]:
    """``(id, caption, png path)`` of every figure in ``run_dir/report.md``, in report order."""
    report = run_dir / "report.md"
    if not report.is_file():
        raise FileNotFoundError(f"{run_dir} has no report.md: is it a finished `deepufm run`?")
    text = report.read_text(encoding="utf-8")
    return [(m[1], " ".join(m[2].split()), run_dir / m[3]) for m in FIGURE.finditer(text)]


def experiment_of(run_dir: Path) -> tuple[str, str]:
    """``(experiment, preset)`` of a run directory, from its ``manifest.json``."""
    manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    if manifest.get("kind") != "experiment":
        raise ValueError(f"{run_dir} holds a {manifest.get('kind')!r} run, not an experiment")
    name, _, preset = manifest["name"].partition("/")
    return name, preset


def run_dirs(paths: list[Path]) -> list[Path]:
    """The experiment run directories in ``paths``: each path itself when it holds a
    ``report.md``, else its subdirectories that do (a ``deepufm run all`` directory)."""
    found = []
    for path in paths:
        if (path / "report.md").is_file():
            found.append(path)
            continue
        subs = sorted(p for p in path.iterdir() if (p / "report.md").is_file())
        if not subs:
            raise FileNotFoundError(f"no finished experiment run in {path} (no report.md)")
        found += subs
    return found


def shrink(src: Path, dst: Path, max_width: int = MAX_WIDTH) -> tuple[int, int]:
    """Copy the PNG ``src`` to ``dst`` at most ``max_width`` pixels wide (aspect kept), quantised to
    a 256-colour palette and optimised. Returns the new ``(width, height)``."""
    from PIL import Image  # a dependency of matplotlib

    with Image.open(src) as img:
        img = img.convert("RGB")
        if img.width > max_width:
            height = round(img.height * max_width / img.width)
            img = img.resize((max_width, height), Image.Resampling.LANCZOS)
        dst.parent.mkdir(parents=True, exist_ok=True)
        img.quantize(256).save(dst, optimize=True)
        return img.size


def collect(paths: list[Path], gallery_dir: Path = GALLERY_DIR) -> dict[str, list[str]]:
    """Copy the figures of the finished runs under ``paths`` into ``gallery_dir/<experiment>/``,
    with their captions and the preset in ``captions.json``. An experiment's old images are
    replaced. Returns ``{experiment: [figure ids]}``."""
    done: dict[str, list[str]] = {}
    for run_dir in run_dirs([Path(p) for p in paths]):
        name, preset = experiment_of(run_dir)
        figures = report_figures(run_dir)
        target = gallery_dir / name
        if target.is_dir():
            for old in target.glob("*.png"):
                old.unlink()
        captions = {}
        for fid, caption, png in figures:
            shrink(png, target / f"{fid}.png")
            captions[fid] = caption
        target.mkdir(parents=True, exist_ok=True)
        record = {"experiment": name, "preset": preset, "captions": captions}
        (target / "captions.json").write_text(
            json.dumps(record, indent=1, ensure_ascii=False) + "\n"
        )
        done[name] = list(captions)
    return done


def _escape(text: str) -> str:
    return ESCAPE.sub(r"\\\1", text).replace("<", "&lt;")


def gallery_page(gallery_dir: Path = GALLERY_DIR) -> str:
    """``docs/gallery.md``: per experiment of the registry its ids and contents, then every figure
    image present in ``gallery_dir/<experiment>/`` with its caption and the reproducing command."""
    from deepufm.experiments.registry import EXPERIMENTS, PRESETS

    lines = [
        "# Gallery",
        "",
        "The figures and tables each experiment writes, by id — from the experiment registry",
        "(`deepufm run --list`). `deepufm run EXPERIMENT` writes `figures/<id>.png` and `.pdf`",
        "(tables: `tables/<id>.md` and `.csv`) into its run directory, with every prediction",
        "beside its measurement in `report.html`; presets: "
        + ", ".join(f"`{p}`" for p in PRESETS)
        + ". The images below come from quick runs (`python docs/make_gallery.py` copies them);",
        "the paper preset trains far longer.",
        "",
    ]
    for exp in EXPERIMENTS.values():
        data = " Needs `--data-dir` unless the data ship with an extra." if exp.needs_data else ""
        lines += [f"## `{exp.name}`", "", f"{exp.description}.{data}", "", "| id | content |"]
        lines += ["|---|---|"]
        lines += [f"| `{it.id}` | {it.description} |" for it in exp.items]
        lines += ["", "```bash", f"deepufm run {exp.name}", "```", ""]
        record_file = gallery_dir / exp.name / "captions.json"
        if not record_file.is_file():
            continue
        record = json.loads(record_file.read_text(encoding="utf-8"))
        command = f"deepufm run {exp.name} --preset {record['preset']}"
        for fid, caption in record["captions"].items():
            if not (gallery_dir / exp.name / f"{fid}.png").is_file():
                continue
            src = f"{gallery_dir.name}/{exp.name}/{fid}.png"
            lines += [f"### `{fid}` ({exp.name})", "", f"![{fid}]({src})", "", _escape(caption), ""]
            lines += [f"Reproduce: `{command}` → `figures/{fid}.png`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python docs/make_gallery.py [RUN_DIR ...]`` (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "runs", nargs="*", type=Path, help="finished run directories (or a run-all one)"
    )
    args = parser.parse_args(argv)
    if args.runs:
        for name, ids in collect(args.runs).items():
            print(f"{name}: {len(ids)} figures -> {GALLERY_DIR / name}")
    PAGE.write_text(gallery_page(), encoding="utf-8")
    total = sum(p.stat().st_size for p in GALLERY_DIR.rglob("*.png")) if GALLERY_DIR.is_dir() else 0
    print(f"{PAGE}: written; images {total / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
