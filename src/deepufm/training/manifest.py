"""What deepufm wrote into a run directory: ``manifest.json``, and the overwrite rule built on it.

``manifest.json`` = ``{"deepufm_version", "kind", "name", "status", "files", "previous",
"schema"}``:

* ``kind``/``name``: who owns the directory: ``"train"`` (``deepufm train``), ``"network"``
  (:func:`deepufm.training.network.train`), ``"experiment"`` with ``name`` the experiment and
  preset (``"linear-ufm/quick"``) or ``"probe"`` (:class:`deepufm.TrainingProbe` in a user's
  own training loop);
* ``status``: ``"running"`` until the run completes, then ``"complete"``;
* ``files``: every path (relative, ``/``-separated) this run wrote, recorded *before* writing it;
* ``previous``: what the run it replaces wrote and this one has not rewritten yet; deleted when
  this run completes, so that a kill before then leaves the earlier results in place;
* ``schema``: the version of the measurement files' keys (``metrics.jsonl`` rows), an integer;
  a manifest without it is version 1. :data:`SCHEMA_CHANGES` says which kinds of run each
  version changed; a run is continued only when none changed its kind since the directory's
  version (:func:`check_schema`).

Only paths written while holding the directory's lock (:mod:`deepufm.training.lock`) are recorded,
and only recorded paths are ever replaced or deleted: files deepufm did not write stay.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from deepufm import __version__
from deepufm.errors import ConfigError
from deepufm.training import lock

MANIFEST = "manifest.json"
KINDS = ("train", "network", "experiment", "probe")
_OURS = {MANIFEST, lock.LOCK}

SCHEMA_CHANGES: dict[int, tuple[tuple[str, str], ...]] = {
    2: (
        (
            "experiment",
            "the experiments' probe rows took layer_report's keys (hessian_top -> "
            "hessian_eigenvalues, f -> eigvec_alignment, gamma -> gradient_coefficients, "
            "knockout_* -> knockout_eigenvalues {class, cross, within}, weight_gram_top "
            "(eigenvalues of W^T W) -> weight_singular_values, ...), which old rows cannot be "
            "converted to exactly",
        ),
    ),
}
"""Schema version -> ``(kind, what changed)`` for each kind of run whose measurement files it
changed. Version 2: the experiments' ``metrics.jsonl`` probe rows (``deepufm train``, network
and probe runs kept their keys, so their version-1 directories are continued as they are). The
old probe rows lack what the new ones hold (all singular values of ``W_l`` where they kept the
top ``K + 2`` eigenvalues of ``W_l^T W_l``, ``effective_rank_weight``, knockouts by the exact
route), so they are not rewritten: such a directory is refused with what to do."""

SCHEMA_VERSION: int = max(SCHEMA_CHANGES)
"""The schema version this deepufm writes (recorded as ``schema`` in ``manifest.json``)."""


@dataclass(frozen=True)
class Manifest:
    """The contents of ``manifest.json`` (module docstring)."""

    kind: str
    name: str = ""
    status: str = "running"
    files: tuple[str, ...] = ()
    previous: tuple[str, ...] = ()
    deepufm_version: str = __version__
    schema: int = SCHEMA_VERSION

    @property
    def owner(self) -> str:
        """``"train"``, ``"network"`` or ``"experiment linear-ufm/quick"``, for messages."""
        return f"{self.kind} {self.name}".strip()

    @property
    def complete(self) -> bool:
        """Whether the run finished (``status == "complete"``)."""
        return self.status == "complete"


def read_manifest(run_dir: Path | str) -> Manifest | None:
    """The directory's manifest; ``None`` when it has none (or an unreadable one)."""
    path = Path(run_dir) / MANIFEST
    try:
        data = json.loads(path.read_text())
        return Manifest(
            kind=str(data["kind"]),
            name=str(data.get("name", "")),
            status=str(data["status"]),
            files=tuple(data["files"]),
            previous=tuple(data.get("previous", ())),
            deepufm_version=str(data.get("deepufm_version", "")),
            schema=int(data.get("schema", 1)),  # written before schema versions: version 1
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_manifest(run_dir: Path | str, manifest: Manifest) -> None:
    """Write ``manifest.json`` atomically (never itself recorded in ``files``)."""
    from deepufm.training.rundir import atomic_write

    data = asdict(manifest) | {"files": list(manifest.files), "previous": list(manifest.previous)}
    text = json.dumps(data, indent=2) + "\n"
    atomic_write(Path(run_dir) / MANIFEST, lambda f: f.write(text), mode="w", record=False)


def foreign_files(run_dir: Path, manifest: Manifest | None) -> list[str]:
    """Top-level entries deepufm did not write (a directory counts when nothing in it is ours)."""
    known = set() if manifest is None else set(manifest.files) | set(manifest.previous)
    tops = {p.split("/", 1)[0] for p in known}
    out = []
    for entry in sorted(run_dir.iterdir()):
        name = entry.name
        if name in _OURS or (name.startswith(".") and name.endswith(".tmp")):
            continue
        if name not in known and name not in tops:
            out.append(name)
    return out


def record(path: Path | str) -> None:
    """Add ``path`` to the manifest of the held run directory it lies in (if any)."""
    path = Path(path).resolve()
    for run_dir in lock.held_dirs():
        if run_dir in path.parents:
            manifest = read_manifest(run_dir)
            if manifest is None:
                return
            rel = path.relative_to(run_dir).as_posix()
            if rel not in manifest.files:
                previous = tuple(p for p in manifest.previous if p != rel)
                write_manifest(
                    run_dir, replace(manifest, files=(*manifest.files, rel), previous=previous)
                )
            return


def check_directory(out: Path, param: str = "--out") -> None:
    """``out`` is a directory or can become one: no file at it or above it."""
    for p in (out, *out.parents):
        if p.exists() and not p.is_dir():
            where = "is a file" if p == out else f"lies under the file {p}"
            raise ConfigError(param, str(out), "a directory path", f"{out} {where}.")
        if p.is_dir():
            return


def begin(
    run_dir: Path,
    kind: str,
    name: str = "",
    *,
    overwrite: bool = False,
    resume: bool = False,
    rerun: bool = False,
    param: str = "--out",
) -> bool:
    """Take ``run_dir`` (held, existing) for a run of ``kind``/``name``; returns whether the run
    continues an unfinished one (``resume``) rather than starting afresh.

    A directory holding the same run may be resumed; when finished, rerun only with ``rerun``
    (``deepufm run``) or ``overwrite``. Any other non-empty directory (another kind of run, files
    deepufm did not write) is refused unless ``overwrite``. Starting afresh moves the earlier
    run's files to ``previous``: they are replaced as the new run writes them, the rest deleted
    when it completes (:func:`finish`); files deepufm did not write are never touched.
    """
    old = read_manifest(run_dir)
    same = old is not None and (old.kind, old.name) == (kind, name)
    if resume and same:
        check_schema(run_dir, old, param)
        if old.schema != SCHEMA_VERSION:  # no change to this kind since: it is current
            write_manifest(run_dir, replace(old, schema=SCHEMA_VERSION))
        return True
    foreign = foreign_files(run_dir, old)
    if not overwrite and (foreign or (old is not None and not (same and rerun))):
        if old is not None and not foreign:
            what = f"a {old.owner} run ({old.status})"
        elif old is None:
            what = f"files deepufm did not write ({', '.join(foreign[:5])})"
        else:
            what = f"a {old.owner} run and files deepufm did not write ({', '.join(foreign[:5])})"
        hint = "continue it with --resume or " if same else ""
        raise ConfigError(
            param,
            str(run_dir),
            f"a new or empty directory, or one holding this same {kind} run",
            f"It holds {what}; {hint}replace deepufm's files there with --overwrite "
            "(files deepufm did not write are left alone), or choose another directory.",
        )
    previous = () if old is None else tuple(dict.fromkeys((*old.previous, *old.files)))
    write_manifest(run_dir, Manifest(kind, name, "running", (), previous))
    return False


def schema_changes(kind: str, schema: int) -> list[tuple[int, str]]:
    """``(version, what changed)`` for every schema version after ``schema`` that changed the
    measurement files of runs of ``kind`` (empty: a directory of ``schema`` is current)."""
    return [
        (version, what)
        for version, changes in sorted(SCHEMA_CHANGES.items())
        if version > schema
        for k, what in changes
        if k == kind
    ]


def check_schema(run_dir: Path, manifest: Manifest, param: str = "--out") -> None:
    """Refuse to continue the run in ``run_dir`` when its measurement files are of an older
    schema than this deepufm writes for its kind (appending would mix two sets of keys, and the
    figures and checks read the new ones); the message names the directory, both versions and
    what to do. Nothing is written."""
    changes = schema_changes(manifest.kind, manifest.schema)
    if not changes:
        return
    written = f" (deepufm {manifest.deepufm_version})" if manifest.deepufm_version else ""
    what = "; ".join(f"version {v}: {text}" for v, text in changes)
    if manifest.kind == "experiment":
        todo = (
            "Start it again with --overwrite (deepufm's files there are replaced), or run "
            "into another --out to keep it as it is"
        )
    else:
        todo = "Start it again with overwrite=True, or train into another directory to keep it"
    raise ConfigError(
        param,
        str(run_dir),
        f"a run directory of measurement schema version {SCHEMA_VERSION} ({manifest.kind} "
        "runs) to continue",
        f"{run_dir} holds the {manifest.owner} run written with schema version "
        f"{manifest.schema}{written}, and this deepufm writes version {SCHEMA_VERSION} ({what}). "
        f"{todo}; nothing was changed there.",
    )


def finish(run_dir: Path) -> None:
    """Mark the run complete and delete what the replaced run wrote and this one did not."""
    manifest = read_manifest(run_dir)
    if manifest is None:
        return
    for rel in manifest.previous:
        if rel in manifest.files:
            continue
        path = run_dir / rel
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            path.unlink()
        parent = path.parent
        while parent != run_dir and run_dir in parent.parents:
            with contextlib.suppress(OSError):
                parent.rmdir()  # only when empty: never a folder that holds other files
            parent = parent.parent
    write_manifest(run_dir, replace(manifest, status="complete", previous=()))


def resume_hint(run_dir: Path) -> str:
    """The command that continues the run in ``run_dir``."""
    manifest = read_manifest(run_dir)
    if manifest is None:
        try:
            kind = json.loads((Path(run_dir) / "config.json").read_text()).get("kind")
        except (OSError, ValueError, AttributeError):
            kind = None
        manifest = Manifest("network") if kind == "network" else None
    if manifest is not None and manifest.kind == "experiment":
        exp, _, preset = manifest.name.partition("/")
        return f"deepufm run {exp} --preset {preset or 'quick'} --out {run_dir} --resume"
    if manifest is not None and manifest.kind == "probe":
        return f"deepufm.TrainingProbe(data, loss, out_dir={str(run_dir)!r}) (it continues the log)"
    if manifest is not None and manifest.kind == "network":
        where = repr(str(run_dir))
        try:
            payload = json.loads((Path(run_dir) / "config.json").read_text())
            own = payload["data"]["name"] != payload["training"].get("dataset", "mnist-embedded")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            own = True
        args = f"{where}, data" if own else where
        return (
            f"deepufm.training.network.resume_run({args}) (or "
            f"deepufm.training.network.train(config, data, {where}, resume=True))"
        )
    return f"deepufm train --resume {run_dir}"
