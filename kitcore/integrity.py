"""Checksums: what the kit writes and reads again is verified before it is used.

Every artifact directory the kit writes (an exported adapter or model, a checkpoint, a data cache,
data-prep's splits) records each file's size and XXH3-128 digest when it is written, and the
reader checks them before it uses a byte: a flipped block, a truncated copy or a missing file is
found and named, never trained or evaluated on. XXH3 hashes at memory speed (about 15 GB/s on one
core of the CI machine), so verification costs what reading the files costs.

    checksums.json   {"format": 1, "algorithm": "xxh3_128",
                      "files": {"adapter_model.safetensors": {"bytes": 1234, "xxh3_128": "..."}, ...}}

`write_manifest(dir)` hashes every file under `dir` and writes checksums.json atomically, last;
`verify(dir)` checks them and returns a `Report` (intact, missing, damaged); `require_intact`
raises `IntegrityError` naming each bad file. An artifact from before checksums existed has no
manifest: it still loads, with a one-line note. `FINETUNE_VERIFY=0` skips verification (a trusted
local disk, a huge checkpoint read many times); `finetune verify PATH` checks any artifact by hand.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kitcore.io import atomic_write_text

logger = logging.getLogger(__name__)

__all__ = ["ALGORITHM", "MANIFEST", "IntegrityError", "Report", "file_digest", "entry", "digest_files",
           "list_files", "write_manifest", "update_manifest", "read_manifest", "require_listed_intact", "verify_tree", "verify", "verify_entries", "require_intact",
           "verification_enabled"]

ALGORITHM = "xxh3_128"
_ALGORITHMS = (ALGORITHM, "sha256")  # what a manifest entry may record, in order of preference
MANIFEST = "checksums.json"
FORMAT = 1
CHUNK = 8 << 20  # 8 MiB reads: large enough for memory speed, small enough for any RAM
HASH_THREADS = 4  # xxhash releases the GIL while hashing: several files are read and hashed at once


class IntegrityError(Exception):
    """A file the kit wrote earlier is missing, truncated or damaged."""


def verification_enabled() -> bool:
    """False when FINETUNE_VERIFY is 0/false/off/no (skip checksum verification on read)."""
    return os.environ.get("FINETUNE_VERIFY", "1").strip().lower() not in ("0", "false", "off", "no")


def file_digest(path: str | os.PathLike, algorithm: str = ALGORITHM) -> str:
    """The digest of a file, hex: XXH3-128, or SHA-256 (data-prep's shard manifests record it)."""
    if algorithm == "sha256":
        import hashlib

        h = hashlib.sha256()
    else:
        import xxhash

        h = xxhash.xxh3_128()
    with open(path, "rb", buffering=0) as fh:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def entry(path: str | os.PathLike) -> dict[str, Any]:
    """{"bytes": size, "xxh3_128": digest} of one file."""
    return {"bytes": os.path.getsize(path), ALGORITHM: file_digest(path)}


def _each(fn, names: list[str]) -> dict[str, Any]:
    """{name: fn(name)}, a few files at a time."""
    if len(names) <= 1:
        return {n: fn(n) for n in names}
    with ThreadPoolExecutor(min(HASH_THREADS, len(names))) as pool:
        return dict(zip(names, pool.map(fn, names)))


def digest_files(root: str | os.PathLike, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """{name: entry} for files named relative to `root`, hashed a few at a time."""
    root = Path(root)
    return _each(lambda n: entry(root / n), list(names))


def list_files(root: str | os.PathLike, exclude: Iterable[str] = ()) -> list[str]:
    """Every file under `root` (relative paths, sorted), but dotfiles, `exclude` and the manifest."""
    root = Path(root)
    skip = set(exclude) | {MANIFEST}
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if f.startswith("."):  # temp files of atomic writes
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), root)
            if rel not in skip and f not in skip:
                out.append(rel)
    return out


def write_manifest(directory: str | os.PathLike, *, exclude: Iterable[str] = (),
                   files: Mapping[str, Mapping[str, Any]] | None = None,
                   extra: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Hash every file under `directory` (but `exclude`, dotfiles and the manifest itself) and
    write checksums.json there, atomically; call it after the last file is written. `files`: the
    entries, when they were hashed already (by several processes)."""
    d = Path(directory)
    files = dict(files) if files is not None else digest_files(d, list_files(d, exclude))
    doc = {"format": FORMAT, "algorithm": ALGORITHM, "files": files, **(extra or {})}
    atomic_write_text(d / MANIFEST, json.dumps(doc, indent=1, sort_keys=True))
    return files


def update_manifest(directory: str | os.PathLike, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Add (or replace) the entries of the files `names` in the directory's checksums.json, keeping
    the others: for a directory that collects outputs one at a time (GGUF exports)."""
    d = Path(directory)
    doc = read_manifest(d) or {"format": FORMAT, "algorithm": ALGORITHM, "files": {}}
    doc["files"] = {k: v for k, v in doc["files"].items() if (d / k).is_file()}
    doc["files"].update(digest_files(d, names))
    atomic_write_text(d / MANIFEST, json.dumps(doc, indent=1, sort_keys=True))
    return doc["files"]


def read_manifest(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The directory's checksums.json, None when it has none; an unreadable one is damage."""
    f = Path(directory) / MANIFEST
    if not f.is_file():
        return None
    try:
        doc = json.loads(f.read_text())
        if not isinstance(doc.get("files"), dict):
            raise ValueError("no 'files' table")
    except (OSError, ValueError, AttributeError) as exc:
        raise IntegrityError(f"{f}: the checksum manifest is unreadable ({exc})") from exc
    return doc


@dataclass
class Report:
    """What a verification found. `damaged` holds (file, reason) pairs."""

    root: Path
    intact: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    damaged: list[tuple[str, str]] = field(default_factory=list)
    unlisted: list[str] = field(default_factory=list)  # files the manifest does not know (not checked)
    has_manifest: bool = True
    bytes_checked: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.missing and not self.damaged

    def problems(self) -> list[str]:
        return ([f"{self.root / m}: missing" for m in self.missing]
                + [f"{self.root / f}: {why}" for f, why in self.damaged])

    def summary(self) -> str:
        if not self.has_manifest:
            return f"{self.root}: no checksums recorded (written before checksums existed); not verified"
        head = (f"{self.root}: {len(self.intact)} intact, {len(self.missing)} missing, {len(self.damaged)} damaged"
                f" ({self.bytes_checked / 1e6:.1f} MB in {self.seconds:.2f} s)")
        return "\n".join([head, *("  " + p for p in self.problems())])


def verify_entries(root: str | os.PathLike, files: Mapping[str, Mapping[str, Any]]) -> Report:
    """Check files (relative to `root`) against their recorded size and digest."""
    import time

    root = Path(root)
    rep = Report(root)
    t0 = time.perf_counter()
    present = []
    for name, rec in files.items():
        p = root / name
        if not p.is_file():
            rep.missing.append(name)
            continue
        size = p.stat().st_size
        if size != rec.get("bytes", size):
            rep.damaged.append((name, f"size {size} bytes, {rec['bytes']} were written (truncated or replaced)"))
            continue
        present.append(name)
    algo = {n: next((a for a in _ALGORITHMS if a in files[n]), None) for n in present}
    digests = _each(lambda n: file_digest(root / n, algo[n]), [n for n in present if algo[n]])
    for name in present:
        rep.bytes_checked += (root / name).stat().st_size
        a = algo[name]
        if a and digests[name] != files[name][a]:
            rep.damaged.append((name, f"content differs from what was written ({a} "
                                      f"{digests[name][:12]}…, recorded {files[name][a][:12]}…)"))
        else:
            rep.intact.append(name)
    rep.seconds = time.perf_counter() - t0
    return rep


def verify(directory: str | os.PathLike, *, exclude: Iterable[str] = ()) -> Report:
    """Verify a directory against its checksums.json (a Report with has_manifest=False when it has
    none). Files not in the manifest are listed as `unlisted`, not judged."""
    d = Path(directory)
    doc = read_manifest(d)
    if doc is None:
        return Report(d, has_manifest=False)
    rep = verify_entries(d, doc["files"])
    known = set(doc["files"])
    rep.unlisted = [f for f in list_files(d, exclude) if f not in known]
    return rep


def require_intact(directory: str | os.PathLike, what: str, *, exclude: Iterable[str] = (),
                   note: int = logging.WARNING) -> Report | None:
    """Verify `directory` before it is used as `what` ("adapter", "checkpoint", ...): raise
    IntegrityError naming every missing or damaged file; a one-line note (logged at level `note`)
    when it has no checksums. None when verification is switched off (FINETUNE_VERIFY=0)."""
    if not verification_enabled():
        return None
    rep = verify(directory, exclude=exclude)
    if not rep.has_manifest:
        logger.log(note, "%s %s has no %s (written before checksums existed): used unverified "
                   "(`finetune verify --record %s` records them)", what, directory, MANIFEST, directory)
        return rep
    if not rep.ok:
        raise IntegrityError(f"the {what} {directory} is damaged: " + "; ".join(rep.problems())
                             + f". It no longer matches the checksums recorded when it was written ({MANIFEST}); "
                             "restore it from a good copy or write it again. If you changed it on purpose, record "
                             f"its new checksums: finetune verify --record {directory}")
    return rep


def require_listed_intact(path: str | os.PathLike, what: str = "data file") -> None:
    """Verify one file against the checksums.json of its directory, when that lists it (data-prep's
    train.jsonl, val.jsonl, ...): IntegrityError naming it when it differs."""
    if not verification_enabled():
        return
    p = Path(path)
    doc = read_manifest(p.parent)
    if doc is None or p.name not in doc["files"]:
        return
    rep = verify_entries(p.parent, {p.name: doc["files"][p.name]})
    if not rep.ok:
        raise IntegrityError(f"the {what} {'; '.join(rep.problems())}. It no longer matches the checksum recorded "
                             f"when it was written ({p.parent / MANIFEST}); write it again (or restore it)")


# ----------------------------------------------------------------------------------------------
# `finetune verify PATH`: every manifest under a path
# ----------------------------------------------------------------------------------------------
CACHE_META = "meta.json"  # a data cache's manifest (finetune.data.cache), beside its COMPLETE marker
SHARD_MANIFEST = "manifest.json"  # a data-prep shard directory's (data_prep.writers), SHA-256 per shard


def _kind_entries(d: Path) -> list[tuple[str, dict[str, Any], set[str]]]:
    """(kind, {file: entry}, files they cover) for each manifest directly in directory `d`."""
    out = []
    if (d / MANIFEST).is_file():
        doc = read_manifest(d)
        kind = ("checkpoint" if d.name.startswith("checkpoint-") else
                "adapter" if (d / "adapter_config.json").is_file() else
                "model" if (d / "config.json").is_file() else "output")
        out.append((kind, doc["files"], {MANIFEST, "COMPLETE"} if kind == "checkpoint" else {MANIFEST}))
    meta = d / CACHE_META
    if meta.is_file() and (d / "COMPLETE").is_file():
        try:
            doc = json.loads(meta.read_text())
            out.append(("data cache", {sh["file"]: sh for sh in doc["shards"]}, {CACHE_META, "COMPLETE"}))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(f"{meta}: the data cache's manifest is unreadable ({exc})") from exc
    shard = d / SHARD_MANIFEST
    if shard.is_file():
        try:
            doc = json.loads(shard.read_text())
            if "shards" in doc:
                out.append(("data-prep shards", {sh["file"]: sh for sh in doc["shards"]}, {SHARD_MANIFEST}))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(f"{shard}: the shard manifest is unreadable ({exc})") from exc
    return out


def verify_tree(path: str | os.PathLike) -> list[tuple[str, Report]]:
    """Verify every artifact at or under `path` against its manifest: [(kind, Report)], one per
    manifest found; a file is checked against the manifest of its directory. An unreadable
    manifest is reported as damage; a directory with no manifest anywhere gives []."""
    p = Path(path)
    if p.is_file():
        for kind, files, _ in _kind_entries(p.parent):
            if p.name in files:
                return [(kind, verify_entries(p.parent, {p.name: files[p.name]}))]
        return []
    found = []
    for dirpath, dirnames, _ in os.walk(p):
        dirnames[:] = sorted(x for x in dirnames if not x.startswith("."))
        d = Path(dirpath)
        try:
            kinds = _kind_entries(d)
        except IntegrityError as exc:
            found.append(("manifest", Report(d, damaged=[("(manifest)", str(exc))])))
            continue
        for kind, files, own in kinds:
            rep = verify_entries(d, files)
            if kind != "data cache":  # a cache also holds its readers' markers; nothing else is expected
                covered = set(files) | own
                rep.unlisted = [f for f in os.listdir(d) if (d / f).is_file() and not f.startswith(".")
                                and f not in covered and not any(f in fs for _, fs, _ in kinds)]
            found.append((kind, rep))
    return found
