"""Output files of a build (atomic, through kitcore.io) and the output-directory policy."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kitcore.io import AtomicFile, atomic_write

__all__ = [
    "OUTPUT_FILES",
    "AtomicFile",
    "JsonlWriter",
    "OutputDirError",
    "atomic_write",
    "check_output_dir",
    "write_json",
]

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
