"""Tokenized training data on disk: built once, by one process, memory-mapped by every rank.

    chat JSONL --(read, check, chat template + loss masks; worker processes)--> shard-*.arrow
    every rank: datasets.Dataset.from_file(shard) (memory-mapped) -> the Trainer

The cache is keyed by everything that changes the tokens: the data file (its SHA-256, or its size
and mtime with `data.cache_key: stat`; for a dataset of shards, every shard's, in order), the tokenizer (its full serialized state, added tokens and
special tokens), the chat template, `max_length`, `data.loss_on`, `data.too_long`, and FORMAT_VERSION
(not `packing`: packed and padded batches read the same tokens). A changed input gives another key, so a stale cache is never read; the old one is
simply not used (see "clearing" below).

Where: `data.cache_dir`, by default `.finetune-cache/` next to the data file (next to the shard
directory for shards), so every run and
every sweep trial on the same data and tokenizer shares one build; when that directory is not
writable, `<output_dir>/data-cache/`. Layout: `<cache_dir>/<file stem>-<key[:16]>/` holding
`shard-NNNNN.arrow` (Arrow IPC streams of input_ids, labels, length, line), `meta.json` (the key's
inputs, the statistics, each shard's size) and `COMPLETE`. A build goes to a temporary directory
that is renamed into place only once complete, so a killed build leaves nothing that is read; a
cache whose files do not match `meta.json` (a truncated copy, a deleted shard) is rebuilt.

Who builds (`data.cache_build`): `local_main` (default) is local rank 0 of every node, which is
right whether or not the cache directory is shared between nodes (on a shared filesystem two
nodes may both build; the first rename wins and the other copy is discarded); `main` is global
rank 0 only, one build for the whole job, for a cache directory every node sees. The other ranks
poll for COMPLETE for up to `data.cache_wait_s`, then memory-map it. The polling is no collective,
so a long build never runs into the process group's timeout. `finetune prepare CONFIG` builds the
cache ahead of the launch (on a CPU node, with `data.num_proc` worker processes), and
`finetune train` then starts without tokenizing.

Clearing: delete the cache directory (`rm -r DATA_DIR/.finetune-cache`); nothing else refers to it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any

from finetune.data.chat_template import IGNORE_INDEX, ChatFormatError, assistant_spans
from finetune.data.files import DataFiles, DataStats, data_files
from finetune.data.kinds import CHAT, kind
from finetune.data.shards import ENCODE_BATCH, MAX_SHOWN_PROBLEMS, CacheSpec, ShardResult, iter_lines
from kitcore.integrity import (
    ALGORITHM,
    digest_files,
    file_digest,
    require_listed_intact,
    verification_enabled,
    verify_entries,
)

logger = logging.getLogger(__name__)

__all__ = ["FORMAT_VERSION", "CacheSpec", "encode_conversations", "cache_key", "build_cache", "open_cache",
           "prepared_split", "default_num_proc"]

# Bump when what a row holds, or how it is computed, changes: every old cache is then ignored.
# 2: per-message weights, tools and tool calls reach the chat template (1 trained weight-0 turns).
FORMAT_VERSION = 2
COMPLETE = "COMPLETE"
PARALLEL_MIN_BYTES = 16 << 20  # below this a build runs in-process


class CacheError(RuntimeError):
    """The cache could not be built or waited for; the message says what to change."""


# ----------------------------------------------------------------------------------------------
# encoding: the chat template once per example, the tokenizer once per batch, masks by array ops
# ----------------------------------------------------------------------------------------------
def _utf8_lengths(text: str):
    """Bytes per character of `text`, as an array (for bits per byte of the trained text)."""
    import numpy as np

    cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    return 1 + (cp >= 0x80).astype(np.int64) + (cp >= 0x800) + (cp >= 0x10000)


def encode_conversations(tokenizer: Any, conversations: list[list[dict]], *, max_length: int,
                         loss_on: str = "assistant", too_long: str = "truncate",
                         tools: list[list | None] | None = None) -> list[dict | str]:
    """Per conversation: {input_ids, labels, n_trained, trained_bytes, truncated} (numpy arrays),
    or the reason it is dropped ("longer_than_max_length"). The same tokens, labels and counts as
    `chat_template.encode_chat`, which stays the reference (`finetune preview`, evaluation): the
    trained spans come from its `assistant_spans` (tools, tool calls and weights included); here
    the tokenizer runs on a whole batch and a token's label is decided for all tokens at once.
    `tools`: each conversation's declared tools (None: none declare any).
    Raises ChatFormatError with `.index` set.
    """
    import numpy as np

    texts, spans = [], []
    for i, msgs in enumerate(conversations):
        try:
            text, sp = assistant_spans(tokenizer, msgs, loss_on, tools[i] if tools else None)  # type: ignore[arg-type]
        except ChatFormatError as exc:
            exc.index = i  # type: ignore[attr-defined]
            raise
        texts.append(text)
        spans.append(sp)
    # The template already carries any BOS it wants; adding special tokens again would double it.
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    out: list[dict | str] = []
    for i, text in enumerate(texts):
        ids = np.asarray(enc["input_ids"][i], dtype=np.int64)
        off = np.asarray(enc["offset_mapping"][i], dtype=np.int64).reshape(-1, 2)
        truncated = len(ids) > max_length
        if truncated and too_long == "drop":
            out.append("longer_than_max_length")
            continue
        s, e = off[:, 0], off[:, 1]
        sp = np.asarray(spans[i], dtype=np.int64).reshape(-1, 2)
        # A token is trained when its characters overlap a trained span: [T, S] comparisons.
        trained = (e > s) & ((s[:, None] < sp[None, :, 1]) & (e[:, None] > sp[None, :, 0])).any(axis=1)
        labels = np.where(trained, ids, IGNORE_INDEX)
        if truncated:
            ids, labels, s, e = ids[:max_length], labels[:max_length], s[:max_length], e[:max_length]
        # Labels are shifted inside the model: the first token can never be trained.
        if len(labels):
            labels[0] = IGNORE_INDEX
        mask = labels != IGNORE_INDEX
        # Bytes of the characters the trained tokens cover (a union: byte-level BPE pieces of one
        # multi-byte character share its offsets): +1/-1 at span edges, then a running sum.
        edges = np.zeros(len(text) + 1, dtype=np.int64)
        np.add.at(edges, s[mask], 1)
        np.add.at(edges, e[mask], -1)
        covered = np.cumsum(edges[:-1]) > 0
        trained_bytes = int(_utf8_lengths(text)[covered].sum()) if len(text) else 0
        out.append({"input_ids": ids, "labels": labels, "n_trained": int(mask.sum()),
                    "trained_bytes": trained_bytes, "truncated": truncated})
    return out


# ----------------------------------------------------------------------------------------------
# the key
# ----------------------------------------------------------------------------------------------
def _file_identity(path: Path, mode: str) -> dict[str, Any]:
    st = path.stat()
    if mode == "stat":
        return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return {"sha256": file_digest(path, "sha256"), "size": st.st_size}


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything about the tokenizer that changes token ids or the rendered text."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())  # vocabulary, merges, normalizer, added tokens
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps({
        "class": type(tokenizer).__name__,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        "pad_token_id": tokenizer.pad_token_id,
        "len": len(tokenizer),
    }, sort_keys=True).encode())
    return h.hexdigest()


def _data_identity(ds: DataFiles, mode: str) -> dict[str, Any]:
    """A single file keys as it always has; shards by each one's identity, in order. A shard that
    no longer matches the SHA-256 its manifest recorded is an error, not a new key."""
    if ds.single:
        return _file_identity(ds.files[0], mode)
    out = []
    for f, recorded in zip(ds.files, ds.sha256):
        ident = _file_identity(f, mode)
        if recorded and "sha256" in ident and ident["sha256"] != recorded:
            raise _changed_shard(f)
        out.append({"file": str(f.relative_to(ds.home)) if f.is_relative_to(ds.home) else str(f), **ident})
    return {"shards": out}


def _changed_shard(f: Path):
    from finetune.data.files import DataError

    return DataError(f"{f}: its SHA-256 differs from the one in {f.parent / 'manifest.json'}; the shard "
                     "changed after data-prep wrote it (rebuild the dataset, or remove the manifest entry)")


def cache_key(spec: CacheSpec, tokenizer: Any) -> tuple[str, dict[str, Any]]:
    inputs = {
        "format_version": FORMAT_VERSION,
        "data": _data_identity(data_files(spec.path), spec.key_mode),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_length": spec.max_length,
        "loss_on": spec.loss_on,
        "too_long": spec.too_long,
    }
    cache_id = kind(spec.kind).cache_id
    if cache_id is not None:
        inputs["kind"] = cache_id
    if spec.completion_room:
        inputs["completion_room"] = spec.completion_room
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest(), inputs


# ----------------------------------------------------------------------------------------------
# building
# ----------------------------------------------------------------------------------------------
def _shards(path: Path, n: int) -> list[tuple[int, int, int]]:
    """Cut the file into about `n` byte ranges at line ends: (start, end, number of its first line)."""
    size = path.stat().st_size
    target = max(1, size // max(1, n))
    out, start, line = [], 0, 1
    with path.open("rb") as fh:
        while start < size:
            fh.seek(min(size, start + target))
            fh.readline()  # finish the line the cut falls in
            end = min(size, fh.tell()) if start + target < size else size
            fh.seek(start)
            lines_in = fh.read(end - start).count(b"\n")
            out.append((start, end, line))
            line += lines_in
            start = end
    return out or [(0, 0, 1)]


def _schema():
    import pyarrow as pa

    return pa.schema([*((c, pa.list_(pa.int32())) for c in CHAT.columns), ("length", pa.int32()), ("line", pa.int64())])


def _build_shard(tokenizer: Any, spec: CacheSpec, source: str, shard: tuple[int, int, int],
                 out_file: str) -> ShardResult:
    """Read one byte range of the data file `source` (the dataset itself, or one of its shards),
    check and encode its lines, write them as one Arrow stream."""
    if kind(spec.kind).prompts:
        from dataclasses import replace

        from finetune.data.prompts import build_prompt_shard

        return build_prompt_shard(tokenizer, replace(spec, path=source), shard, out_file)
    if not kind(spec.kind).chat:
        from dataclasses import replace

        from finetune.data.preference import build_preference_shard

        return build_preference_shard(tokenizer, replace(spec, path=source), shard, out_file)
    import numpy as np
    import pyarrow as pa

    from kitcore.schema import training_example, training_problem

    path = Path(source)
    res = ShardResult(file=out_file, source=source)
    schema = _schema()
    pending: list[tuple[int, dict]] = []  # (line, training_example)

    def flush(writer) -> None:
        if not pending:
            return
        try:
            encoded = encode_conversations(tokenizer, [ex["messages"] for _, ex in pending],
                                           max_length=spec.max_length, loss_on=spec.loss_on,
                                           too_long=spec.too_long, tools=[ex.get("tools") for _, ex in pending])
        except ChatFormatError as exc:
            res.format_error = f"{path}:{pending[exc.index][0]}: {exc}"  # type: ignore[attr-defined]
            pending.clear()
            return
        ids, labels, lengths, lines = [], [], [], []
        for (lineno, _), enc in zip(pending, encoded):
            if isinstance(enc, str):
                res.dropped[enc] += 1
                continue
            if enc["n_trained"] == 0:
                res.untrained.append(f"{path}:{lineno}")
                continue
            res.truncated += enc["truncated"]
            n = len(enc["input_ids"])
            ids.append(enc["input_ids"].astype(np.int32))
            labels.append(enc["labels"].astype(np.int32))
            lengths.append(n)
            lines.append(lineno)
            res.kept += 1
            res.tokens += n
            res.trained_tokens += enc["n_trained"]
            res.max_tokens = max(res.max_tokens, n)
        pending.clear()
        if ids:
            def as_list(arrays):
                offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
                np.cumsum([len(a) for a in arrays], out=offsets[1:])
                return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(arrays)))

            writer.write_batch(pa.record_batch(
                [as_list(ids), as_list(labels), pa.array(lengths, pa.int32()), pa.array(lines, pa.int64())],
                schema=schema))
            res.rows += len(ids)

    with open(out_file, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for lineno, line in iter_lines(path, shard):
            if res.format_error is not None:
                break
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                problem = f"{path}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno})"
            else:
                p = training_problem(obj, require_assistant=True)
                problem = f"{path}:{lineno}: {p}" if p else None
            res.examples += 1
            if problem:
                res.bad_line(problem)
                continue
            pending.append((lineno, training_example(obj)))
            if len(pending) >= ENCODE_BATCH:
                flush(writer)
        flush(writer)
    return res


def _build_shard_star(args) -> ShardResult:
    return _build_shard(*args)


def default_num_proc() -> int:
    """Worker processes for a build: the cores this process may use, at most one per ~1.5 GiB of
    available memory (each holds a tokenizer and a batch), and at least 1."""
    import psutil

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    by_memory = int(psutil.virtual_memory().available // int(1.5 * (1 << 30)))
    return max(1, min(cores, by_memory))


def _merge_and_check(spec: CacheSpec, results: list[ShardResult]) -> dict[str, Any]:
    """The statistics of the whole file, or the DataError training has always raised for it."""
    from finetune.data.files import DataError, untrained_error

    path = spec.path
    bad = sum(r.bad_lines for r in results)
    if bad:
        shown = [p for r in results for p in r.problems][:MAX_SHOWN_PROBLEMS]
        more = f" (the first {len(shown)} shown)" if bad > len(shown) else ""
        first_bad = next(r.source for r in results if r.bad_lines)
        raise DataError(f"{bad} bad line(s) in {path}{more}; fix them or run `data-prep validate {first_bad}`:\n  "
                        + "\n  ".join(shown))
    fmt = next((r.format_error for r in results if r.format_error), None)
    if fmt:
        raise DataError(fmt)
    examples = sum(r.examples for r in results)
    if not examples:
        raise DataError(f"{path} holds no examples (an empty dataset cannot be trained on)")
    untrained = [n for r in results for n in r.untrained]
    if untrained:
        raise untrained_error(untrained, spec.max_length)
    dropped: Counter = Counter()
    for r in results:
        dropped.update(r.dropped)
    kept = sum(r.kept for r in results)
    if not kept:
        raise DataError(f"no example of {path} is left to train on: {dict(dropped)}")
    return {"examples": examples, "kept": kept, "truncated": sum(r.truncated for r in results),
            "dropped": dict(dropped), "tokens": sum(r.tokens for r in results),
            "trained_tokens": sum(r.trained_tokens for r in results),
            "max_tokens": max(r.max_tokens for r in results)}


def build_cache(spec: CacheSpec, tokenizer: Any, final: Path, key: str, key_inputs: dict[str, Any], *,
                num_proc: int | None = None, progress: bool = True) -> Path:
    """Tokenize `spec.path` into `final` (atomically: a temporary directory renamed into place)."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from tqdm.auto import tqdm

    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_builds(final.parent)
    tmp = final.parent / f".build-{final.name}-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    t0 = time.perf_counter()
    ds = data_files(spec.path)
    for f, recorded in zip(ds.files, ds.sha256):
        require_listed_intact(f)  # against data-prep's checksums.json, when it wrote this file
        # a shard's SHA-256 from its manifest (the sha256 key mode checked it already, in cache_key)
        if recorded and spec.key_mode == "stat" and verification_enabled() and file_digest(f, "sha256") != recorded:
            raise _changed_shard(f)
    sizes = [f.stat().st_size for f in ds.files]
    size = sum(sizes)
    workers = num_proc or default_num_proc()
    # Small files are not worth a worker's start-up (it imports transformers to unpickle the
    # tokenizer, ~2 s); a worker gets several shards so that uneven line lengths even out.
    if size < PARALLEL_MIN_BYTES:
        workers = 1
    target = workers * 4 if workers > 1 else 1
    # byte ranges per data file in proportion to its size (at least one each), in file order
    ranges = [(str(f), sh) for f, n in zip(ds.files, sizes)
              for sh in _shards(f, max(1, round(target * n / max(size, 1))))]
    jobs = [(tokenizer, spec, src, sh, str(tmp / f"shard-{i:05d}.arrow")) for i, (src, sh) in enumerate(ranges)]
    bar = tqdm(total=size, unit="B", unit_scale=True, desc=f"tokenizing {Path(spec.path).name}",
               disable=not progress)
    try:
        if workers == 1:
            results = []
            for job in jobs:
                results.append(_build_shard(*job))
                bar.update(job[3][1] - job[3][0])
        else:
            # spawn, not fork: the parent may hold torch/OpenMP and tokenizer thread pools.
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
                results = []
                for job, res in zip(jobs, pool.map(_build_shard_star, jobs)):
                    results.append(res)
                    bar.update(job[3][1] - job[3][0])
        bar.close()
        stats = _merge_and_check(spec, results)
        # Each shard's size and checksum, verified before the cache is read (integrity.ALGORITHM).
        digests = digest_files(tmp, [Path(r.file).name for r in results])
        meta = {"key": key, "inputs": key_inputs, "stats": stats, "seconds": round(time.perf_counter() - t0, 2),
                "num_proc": workers,
                "shards": [{"file": Path(r.file).name, "rows": r.rows, **digests[Path(r.file).name],
                            **({} if ds.single else {"source": r.source})} for r in results]}
        from kitcore.runtime import launch_env

        meta["builder"] = {"host": socket.gethostname(), "pid": os.getpid(), "rank": launch_env()[0]}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        (tmp / COMPLETE).write_text(key)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / COMPLETE).is_file():  # someone else's half build: ours replaces it
                shutil.rmtree(final, ignore_errors=True)
                os.rename(tmp, final)
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
    # One line per build, beside the caches: which process built what, and how long it took.
    with (final.parent / "builds.log").open("a") as log:
        log.write(json.dumps({"cache": final.name, **meta["builder"], "seconds": meta["seconds"],
                              "examples": meta["stats"]["examples"], "num_proc": workers}) + "\n")
    return final


def _remove_dead_builds(parent: Path) -> None:
    """Temporary build directories of killed builds on this host (their pid is gone)."""
    host = socket.gethostname()
    for d in parent.glob(".build-*"):
        head, _, pid = d.name.rpartition("-")
        if head.endswith(f"-{host}") and pid.isdigit():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                shutil.rmtree(d, ignore_errors=True)
            except PermissionError:
                pass


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------
def _valid(final: Path, key: str, *, verify: bool) -> dict[str, Any] | None:
    """meta.json when the cache is complete and its files are the ones it recorded, else None.
    `verify`: also check every shard's checksum (a damaged shard is named in a warning)."""
    try:
        if (final / COMPLETE).read_text() != key:
            return None
        meta = json.loads((final / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    shards = {sh["file"]: sh for sh in meta.get("shards", [])}
    if verify and verification_enabled():
        if shards and not any(ALGORITHM in sh for sh in shards.values()):
            logger.info("data cache %s records no checksums (built before they existed): read unverified", final)
        rep = verify_entries(final, shards)
        if not rep.ok:
            logger.warning("data cache %s is damaged (%s); rebuilding it", final, "; ".join(rep.problems()))
            return None
        return meta
    for name, sh in shards.items():
        f = final / name
        if not f.is_file() or f.stat().st_size != sh["bytes"]:
            return None
    return meta


def open_cache(final: Path, key: str, *, verify: bool = True, verified_by: str | None = None):
    """(Dataset, stats dict) memory-mapped from a complete cache; None when it is absent, broken or
    damaged. `verify`: check the shards' checksums here. `verified_by`: instead, open it only once the
    process that verifies it for this job (the cache's builder) has left its marker."""
    from datasets import Dataset, concatenate_datasets

    if verified_by is not None and not (final / _verified_marker(verified_by)).is_file():
        return None
    meta = _valid(final, key, verify=verify and verified_by is None)
    if meta is None:
        return None
    try:
        parts = [Dataset.from_file(str(final / sh["file"])) for sh in meta["shards"] if sh["rows"]]
        ds = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    except Exception as exc:  # an Arrow file that does not parse: rebuilt by the caller
        logger.warning("data cache %s is unreadable (%s); rebuilding it", final, exc)
        return None
    if len(ds) != meta["stats"]["kept"]:
        return None
    return ds, meta["stats"]


def _verified_marker(job: str) -> str:
    """The dotfile by which a cache's builder tells the other ranks of job `job` that it verified it."""
    return ".verified-" + hashlib.sha256(job.encode()).hexdigest()[:16]


def _mark_verified(final: Path, job: str) -> None:
    """Leave this job's marker (and remove other jobs' markers more than a day old)."""
    now = time.time()
    for old in final.glob(".verified-*"):
        try:
            if now - old.stat().st_mtime > 86400:
                old.unlink()
        except OSError:
            pass
    try:
        (final / _verified_marker(job)).write_text(job)
    except OSError as exc:
        raise CacheError(f"cannot write in the data cache {final} ({exc.strerror or exc}); the other ranks "
                         "wait for a marker there") from exc


def _job_id() -> str:
    """Names this launch (the same on every rank that waits for one builder), so that the failure and
    verification markers of an earlier launch are never trusted.

    torchrun's run id when the launcher set one: its default `--rdzv-id` is "none", the same for every
    launch (`accelerate launch` leaves it so), and is not used. Under Slurm: the job, its step and its
    requeue count. Otherwise the rendezvous address and the launcher's pid (every rank of a node is
    its child), which names one launch on one node: enough for `data.cache_build: local_main`; with
    `main` across nodes outside Slurm, give the launch a run id (`--rdzv_id`)."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if run_id and run_id != "none":
        return run_id
    if os.environ.get("SLURM_JOB_ID"):
        return "slurm:" + ":".join(os.environ.get(k, "") for k in ("SLURM_JOB_ID", "SLURM_STEP_ID",
                                                                      "SLURM_RESTART_COUNT"))
    return f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}:{os.getppid()}"


def _cache_root(cfg, ds: DataFiles) -> Path:
    if cfg.data.cache_dir:
        return Path(cfg.data.cache_dir)
    beside = ds.home.resolve() / ".finetune-cache"
    try:
        beside.mkdir(exist_ok=True)
        if os.access(beside, os.W_OK):
            return beside
    except OSError:
        pass
    return Path(cfg.output_dir) / "data-cache"


def prepared_split(cfg, tokenizer, data_path: str, rt=None, *, num_proc: int | None = None,
                   progress: bool | None = None):
    """The tokenized split as (memory-mapped Dataset, DataStats): from the cache when it is there,
    else built by the designated process while the others wait for it."""
    spec = CacheSpec(path=str(data_path), max_length=cfg.max_length, loss_on=cfg.data.loss_on,
                     too_long=cfg.data.too_long, packing=cfg.packed, key_mode=cfg.data.cache_key,
                     kind=cfg.method_spec.data, completion_room=cfg.method_spec.completion_room(cfg))
    key, inputs = cache_key(spec, tokenizer)
    ds = data_files(data_path)
    final = _cache_root(cfg, ds) / f"{ds.name}-{key[:16]}"
    if rt is None:
        from kitcore.runtime import current

        rt = current()
    builder = rt.is_main if cfg.data.cache_build == "main" else rt.is_local_main
    failed = final.with_name(final.name + ".failed")
    job = _job_id()
    # The builder verifies the shards' checksums once; in a distributed job the other ranks open the
    # cache only after its marker says so (sizes checked, nothing hashed twice per node).
    waits_for_builder = rt.distributed and not builder
    opened = open_cache(final, key, verified_by=job if waits_for_builder else None)
    if opened is None and builder:
        if final.exists():
            logger.warning("data cache %s is incomplete or damaged; rebuilding it", final)
            shutil.rmtree(final, ignore_errors=True)
        failed.unlink(missing_ok=True)
        try:
            build_cache(spec, tokenizer, final, key, inputs, num_proc=num_proc or cfg.data.num_proc,
                        progress=rt.is_main if progress is None else progress)
        except Exception as exc:
            # The waiting ranks read this and stop with the same error instead of timing out.
            failed.write_text(json.dumps({"job": job, "type": type(exc).__name__, "message": str(exc)}))
            raise
        opened = open_cache(final, key, verify=False)  # its shards were hashed as it was built
    if opened is not None and builder and rt.distributed:
        _mark_verified(final, job)
    elif opened is None and not builder:
        from finetune.data.files import DataError

        deadline = time.monotonic() + cfg.data.cache_wait_s
        while opened is None:
            try:
                why = json.loads(failed.read_text())
            except (OSError, ValueError):
                why = None
            if why and why.get("job") == job:
                err = DataError if why.get("type") == "DataError" else CacheError
                raise err(why["message"])
            if time.monotonic() > deadline:
                raise CacheError(
                    f"rank {rt.rank} waited {cfg.data.cache_wait_s:.0f} s for the data cache {final}, which "
                    f"{'global rank 0' if cfg.data.cache_build == 'main' else 'local rank 0 of this node'} builds. "
                    "If the cache directory is not shared between nodes, set data.cache_build=local_main; for a "
                    "long build raise data.cache_wait_s, or build it first with `finetune prepare`.")
            time.sleep(1.0)
            opened = open_cache(final, key, verified_by=job if waits_for_builder else None)
    if opened is None:
        raise CacheError(f"the data cache {final} was built but cannot be read back")
    ds, stats = opened
    st = DataStats(examples=stats["examples"], kept=stats["kept"], truncated=stats["truncated"],
                   dropped=Counter(stats["dropped"]), tokens=stats["tokens"],
                   trained_tokens=stats["trained_tokens"], max_tokens=stats["max_tokens"])
    return ds, st, final
