"""Small helpers shared by the commands: atomic writes and rank-0 output."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

__all__ = ["atomic_write_text", "is_main_process", "rank0_print"]


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def rank0_print(*args, file=None, **kwargs) -> None:
    """User-facing output, once per job (not once per rank)."""
    if is_main_process():
        print(*args, file=file or sys.stdout, flush=True, **kwargs)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write to a temp file in the same directory, fsync, then rename over `path`.

    A crash or a full disk leaves either the old file or the new one, never a half-written one;
    the temp file is removed on failure.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path
