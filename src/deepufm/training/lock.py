"""One writer per run directory: an advisory lock file holding the owner's pid.

The lock is ``fcntl.flock`` on ``<run_dir>/.deepufm.lock``: the kernel drops it when the owner
dies, so a lock file left by a killed run (its pid dead) is stale and simply taken over; the pid
in the file only names the owner in the refusal message. Nested holds by the same process (an
experiment that trains its model into its own directory) are counted, not locked twice.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from deepufm.errors import DeepUFMError, RunError

LOCK = ".deepufm.lock"

# Directories this process holds: resolved path -> (file descriptor, nesting depth). Process state
# mirroring the kernel's locks (which are per process), not configuration.
_HELD: dict[Path, tuple[int, int]] = {}


class LockedError(DeepUFMError):
    """Another live process writes to the run directory."""


def held(run_dir: Path | str) -> bool:
    """Whether this process holds ``run_dir``'s lock."""
    return Path(run_dir).resolve() in _HELD


def held_dirs() -> list[Path]:
    """The run directories this process holds (resolved)."""
    return list(_HELD)


def _owner(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def acquire(run_dir: Path | str) -> None:
    """Take ``run_dir``'s lock (it must exist); a live owner is refused with its pid."""
    key = Path(run_dir).resolve()
    if key in _HELD:
        fd, depth = _HELD[key]
        _HELD[key] = (fd, depth + 1)
        return
    path = key / LOCK
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunError(f"cannot create the lock file {path}: {exc.strerror}.") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise RunError(f"cannot lock {path}: {exc.strerror}.") from exc
            raise LockedError(
                f"{key} is being written by another deepufm process (pid {_owner(path)}); "
                "wait for it to finish, or stop it (it checkpoints on SIGINT/SIGTERM) and resume."
            ) from None
        # The previous owner may have unlinked the file between our open and our lock: then the
        # lock we hold is on a dead inode, and another process may lock the new file. Retry.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD[key] = (fd, 1)


def release(run_dir: Path | str) -> None:
    """Give up one hold of ``run_dir``'s lock (the kernel lock goes with the outermost one)."""
    key = Path(run_dir).resolve()
    fd, depth = _HELD[key]
    if depth > 1:
        _HELD[key] = (fd, depth - 1)
        return
    del _HELD[key]
    with contextlib.suppress(OSError):
        (key / LOCK).unlink()  # while still locked, so that no one locks the dying inode unseen
    os.close(fd)


@contextlib.contextmanager
def locked(run_dir: Path | str) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the block."""
    acquire(run_dir)
    try:
        yield
    finally:
        release(run_dir)
