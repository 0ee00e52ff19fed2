"""Atomic output files and the output-directory policy.

A file appears under its final name only when complete: written to a temp file in the same
directory, fsynced, then os.replace'd (atomic on POSIX). A crash leaves at most a `.tmp` file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

OUTPUT_FILES = ("train.jsonl", "val.jsonl", "test.jsonl", "rejects.jsonl", "report.json")


class OutputDirError(RuntimeError):
    pass


def check_output_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse a non-empty directory unless `overwrite`; create it if missing."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"{path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise OutputDirError(f"{path} is not empty; pass --overwrite to replace its data-prep outputs")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not supported on every filesystem; the rename still happened
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class AtomicFile:
    """Open a temp file next to `path`; `commit()` makes it `path`, `discard()` removes it."""

    def __init__(self, path: str | os.PathLike, mode: str = "w") -> None:
        self.path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self.tmp = Path(tmp)
        self.fh: IO[Any] = os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8")

    def write(self, s: Any) -> int:
        return self.fh.write(s)

    def commit(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        os.replace(self.tmp, self.path)
        _fsync_dir(self.path.parent)

    def discard(self) -> None:
        if not self.fh.closed:
            self.fh.close()
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[AtomicFile]:
    f = AtomicFile(path, mode)
    try:
        yield f
    except BaseException:
        f.discard()
        raise
    f.commit()


class JsonlWriter:
    """Streaming JSONL into an AtomicFile; counts lines."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.file = AtomicFile(path)
        self.count = 0

    def write(self, obj: dict[str, Any]) -> None:
        self.file.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self.count += 1

    def commit(self) -> None:
        self.file.commit()

    def discard(self) -> None:
        self.file.discard()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_write(path) as f:
        f.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
