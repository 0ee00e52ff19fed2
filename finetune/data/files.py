"""Chat JSONL -> token ids + labels, with errors that name file:line and counts for every drop.

A dataset (`data.train`, `data.eval`) is one JSONL file, or several read as one in order
(`data_files`): a shard directory written by `data-prep build --engine ray` (the shards its
manifest.json lists), that manifest.json itself, or a glob of JSONL files (in name order).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kitcore.integrity import require_listed_intact
from kitcore.schema import training_example, training_problem

logger = logging.getLogger(__name__)

__all__ = ["DataError", "DataFiles", "data_files", "read_chat_jsonl", "DataStats",
           "pad_collate"]

MANIFEST = "manifest.json"  # data_prep.writers.MANIFEST: what `data-prep --engine ray` writes per split


class DataError(ValueError):
    """Bad training data; the message names the file and line."""


@dataclass(frozen=True)
class DataFiles:
    """The files of one dataset, in reading order, with the SHA-256 a manifest recorded for each
    (None when there is no manifest, or for a plain file)."""

    spec: str
    files: tuple[Path, ...]
    sha256: tuple[str | None, ...]
    name: str  # names its cache directory: the file's stem, or the shard directory's name

    @property
    def single(self) -> bool:
        """A plain file (not a directory, manifest or glob): read exactly as before shards existed."""
        return len(self.files) == 1 and self.files[0] == Path(self.spec) and self.sha256 == (None,)

    @property
    def home(self) -> Path:
        """Where the dataset lives: the file's directory, or the one above its shard directory."""
        parent = self.files[0].parent
        return parent if self.single else parent.parent


def _from_manifest(spec: str, manifest: Path) -> DataFiles:
    try:
        m = json.loads(manifest.read_text(encoding="utf-8"))
        shards = m["shards"]
        files = tuple(manifest.parent / s["file"] for s in shards)
        sha = tuple(s.get("sha256") for s in shards)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{manifest}: not a readable shard manifest ({type(exc).__name__}: {exc})") from None
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DataError(f"{manifest} lists shards that are missing: {', '.join(missing[:5])}")
    if not files:
        raise DataError(f"{manifest} lists no shards (an empty dataset cannot be trained on)")
    return DataFiles(spec, files, sha, manifest.parent.name)


def data_files(spec: str | Path) -> DataFiles:
    """Resolve `data.train` / `data.eval`: a file; a shard directory (through its manifest.json);
    a manifest.json; or a glob. Raises DataError saying what is missing."""
    spec = str(spec)
    path = Path(spec)
    if path.is_dir():
        if not (path / MANIFEST).is_file():
            raise DataError(
                f"{path} is a directory without {MANIFEST}: not a finished `data-prep --engine ray` output "
                f"(an interrupted build leaves none). To read its files anyway, give a glob: {path}/*.jsonl"
            )
        return _from_manifest(spec, path / MANIFEST)
    if path.name == MANIFEST and path.is_file():
        return _from_manifest(spec, path)
    if path.is_file():
        return DataFiles(spec, (path,), (None,), path.stem)
    if glob.has_magic(spec):
        files = tuple(Path(p) for p in sorted(glob.glob(spec, recursive=True)) if Path(p).is_file())
        if not files:
            raise DataError(f"no file matches {spec}")
        return DataFiles(spec, files, (None,) * len(files), files[0].parent.name)
    # a missing plain file: opening it raises FileNotFoundError, as it always has
    return DataFiles(spec, (path,), (None,), path.stem)


def sha256_files(files) -> str:
    """SHA-256 of the files' bytes one after the other: a shard directory hashes like the single
    file its shards came from."""
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def read_chat_jsonl(path: str | Path, *, require_assistant: bool = True) -> list[dict[str, Any]]:
    """Read chat JSONL strictly: any bad line stops training, and the error names it by file:line.

    `path` may be any dataset `data_files` resolves; records of a multi-file dataset also carry
    their "file". The schema is kitcore.schema's, the one `data-prep validate` checks: a file that
    validates trains. Each record is {"messages", "line"} and "tools" when the line declares any.
    """
    ds = data_files(path)
    records = []
    problems: list[str] = []
    first_bad: Path | None = None
    for path in ds.files:
        require_listed_intact(path)  # against data-prep's checksums.json, when it wrote this file
        with path.open(encoding="utf-8", errors="strict") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    problems.append(f"{path}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno})")
                    first_bad = first_bad or path
                    continue
                problem = training_problem(obj, require_assistant=require_assistant)
                if problem:
                    problems.append(f"{path}:{lineno}: {problem}")
                    first_bad = first_bad or path
                    continue
                rec = {**training_example(obj), "line": lineno}
                if not ds.single:
                    rec["file"] = str(path)
                records.append(rec)
                if len(problems) >= 20:
                    break
        if len(problems) >= 20:
            break
    path = ds.files[0] if ds.single else ds.spec
    if problems:
        more = " (stopped after 20)" if len(problems) >= 20 else ""
        raise DataError(
            f"{len(problems)} bad line(s) in {path}{more}; fix them or run "
            f"`data-prep validate {first_bad}`:\n  " + "\n  ".join(problems)
        )
    if not records:
        raise DataError(f"{path} holds no examples (an empty dataset cannot be trained on)")
    return records


def untrained_error(where: list[str], max_length: int) -> DataError:
    """The error for examples left with no trained token (the reader and the data cache raise it);
    `where` names them as "file:line"."""
    shown = ", ".join(where[:10])
    return DataError(
        f"{len(where)} example(s) have no trained token after the chat template, loss masks "
        f"and max_length={max_length} (e.g. {shown}). Raise `max_length`, set "
        "`data.too_long=drop`, or check `data.loss_on`; `finetune preview` shows the masks."
    )


@dataclass
class DataStats:
    examples: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)
    tokens: int = 0
    trained_tokens: int = 0
    max_tokens: int = 0

    def as_dict(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d["dropped"] = dict(self.dropped)
        return d


def pad_collate(pad_id: int, pad_to_multiple_of: int | None = None):
    """Right-pad a list of {input_ids, labels} into tensors; labels pad with -100."""
    import torch

    def collate(batch: list[dict[str, list[int]]]) -> dict[str, Any]:
        longest = max(len(b["input_ids"]) for b in batch)
        if pad_to_multiple_of:
            longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
        ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), longest), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n] = torch.tensor(b["input_ids"])
            labels[i, :n] = torch.tensor(b["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return collate
