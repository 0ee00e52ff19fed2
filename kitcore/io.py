"""Atomic writes: a file appears under its final name only when it is complete.

Every writer goes through a temp file in the target's directory (a rename within one filesystem is
atomic on POSIX), fsyncs it, then `os.replace`s it over the target; on any failure the temp file is
removed and a previous file of that name is left as it was.

The temp file is created with `os.open(..., 0o666)`, so the kernel applies the umask and the final
file gets the mode any other new file would (0644 under umask 022, 0664 under 002).
`tempfile.mkstemp` creates 0600, and that mode survives the rename: run dirs and datasets shared
by a group would be readable by their owner only.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["AtomicFile", "atomic_write", "atomic_write_text", "atomic_write_via"]


def _create_temp(path: Path) -> tuple[int, Path]:
    """A new, empty, hidden temp file next to `path` (hidden: directory readers skip dotfiles)."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable. Not every filesystem lets a directory be fsynced; the
    # rename has happened either way.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class AtomicFile:
    """A file being written: `write()` streams into a temp file next to `path`, `commit()` makes
    it `path`, `discard()` removes it. `tmp` may be read back before the commit."""

    def __init__(self, path: str | os.PathLike, mode: str = "w") -> None:
        if mode not in ("w", "wb"):
            raise ValueError(f"AtomicFile writes a new file: mode must be 'w' or 'wb', not {mode!r}")
        self.path = Path(path)
        fd, self.tmp = _create_temp(self.path)
        try:
            self.fh: IO[Any] = os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8")
        except BaseException:
            os.close(fd)
            self.tmp.unlink(missing_ok=True)
            raise

    def write(self, s: Any) -> int:
        return self.fh.write(s)

    def commit(self) -> None:
        try:
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self.discard()
            raise
        _fsync_dir(self.path.parent)

    def discard(self) -> None:
        # close() retries a flush that may be what failed (disk full); the temp goes regardless
        with contextlib.suppress(OSError):
            self.fh.close()
        self.tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[AtomicFile]:
    """`with atomic_write(p) as f: f.write(...)`: committed when the block ends, discarded if it raises."""
    f = AtomicFile(path, mode)
    try:
        yield f
    except BaseException:
        f.discard()
        raise
    f.commit()


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically, creating missing parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        f.write(text)
    return path


def atomic_write_via(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """For writers that insist on opening a path themselves (matplotlib's `savefig`):
    `write(tmp)` fills a temp file next to `path`, which then replaces `path` atomically."""
    path = Path(path)
    fd, tmp = _create_temp(path)
    os.close(fd)  # the name is reserved with the umask's mode; `write` truncates and fills it
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path
