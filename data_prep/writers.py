"""Output files of a build (atomic, through kitcore.io) and the output-directory policy.

The local engine writes one file per output (train.jsonl, val.jsonl, test.jsonl, rejects.jsonl).
The Ray engine writes each output as a directory of shards with a manifest:

    OUT/train/part-00000.jsonl, part-00001.jsonl, ...   lines in document order; the shards in
                                                       name order, concatenated, are the local
                                                       engine's train.jsonl
    OUT/train/manifest.json   {"format", "split", "records", "shards": [{"file", "records",
                              "bytes", "sha256"}, ...]}, written last: a directory without it is
                              an unfinished build, which `finetune train` refuses to read
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from data_prep import storage
from kitcore.io import AtomicFile, atomic_write

__all__ = [
    "MANIFEST",
    "OUTPUT_FILES",
    "SHARD_DIRS",
    "AtomicFile",
    "JsonlWriter",
    "OutputDirError",
    "atomic_write",
    "check_output_dir",
    "check_output_url",
    "shard_name",
    "write_json",
    "write_manifest",
    "write_shard",
]

OUTPUT_FILES = ("train.jsonl", "val.jsonl", "test.jsonl", "rejects.jsonl", "report.json",
                "checksums.json")  # the local engine's outputs; checksums.json (kitcore.integrity) written last
SHARD_DIRS = ("train", "val", "test", "rejects")
MANIFEST = "manifest.json"
SHARD_FORMAT = "data-prep-shards/1"


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


def check_output_url(out: str, overwrite: bool) -> None:
    """`check_output_dir` for a path or URL; with `overwrite`, the data-prep outputs already
    there (either engine's) are removed first, so that no stale shard of a larger earlier build
    is left behind. Other files stay."""
    if not storage.is_url(out):
        check_output_dir(out, overwrite)
    elif storage.listdir(out) and not overwrite:
        raise OutputDirError(f"{out} is not empty; pass --overwrite to replace its data-prep outputs")
    if not overwrite:
        return
    for name in OUTPUT_FILES:
        storage.remove(storage.join(out, name))
    for d in SHARD_DIRS:
        sub = storage.join(out, d)
        for name in storage.listdir(sub):
            if name == MANIFEST or (name.startswith("part-") and name.endswith(".jsonl")):
                storage.remove(storage.join(sub, name))


def shard_name(index: int) -> str:
    return f"part-{index:05d}.jsonl"


def write_shard(path: str, lines: Iterable[str]) -> dict[str, Any]:
    """Lines (JSON, no newline) into one shard; its entry of the manifest."""
    h = hashlib.sha256()
    n = size = 0
    with storage.open_write(path) as fh:
        for line in lines:
            data = (line + "\n").encode("utf-8")
            fh.write(data)
            h.update(data)
            n += 1
            size += len(data)
    return {"file": path.rstrip("/").rsplit("/", 1)[-1], "records": n, "bytes": size, "sha256": h.hexdigest()}


def write_manifest(directory: str, split: str, shards: list[dict[str, Any]]) -> dict[str, Any]:
    manifest = {
        "format": SHARD_FORMAT,
        "split": split,
        "records": sum(s["records"] for s in shards),
        "shards": sorted(shards, key=lambda s: s["file"]),
    }
    storage.write_bytes(
        storage.join(directory, MANIFEST), (json.dumps(manifest, indent=1) + "\n").encode("utf-8")
    )
    return manifest
