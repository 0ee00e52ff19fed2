"""`build`: sources -> train/val/test/rejects JSONL + report, the whole data-prep pipeline.

Reads as a table of contents (`Builder.run`): check output dir -> collect join keys ->
read pages and texts (context store + records) -> read annotated rows -> steps -> spool ->
split -> write -> report. Memory holds the dedup index, the split groups and the pages that
annotations join on; the corpus itself streams through a spool file in the output dir.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import time
from array import array
from collections import Counter, defaultdict, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from tqdm import tqdm

from data_prep.convert import ColumnMapping, Converted, RowError, convert_row, detect_kind, join_keys_of_row
from data_prep.readers import detect_format, discover
from data_prep.readers.decode import DecodeError, decode_bytes
from data_prep.readers.html import ExtractOptions, Page, normalize_url, parse_page
from data_prep.readers.tables import TABLE_FORMATS, read_table
from data_prep.readers.text import looks_like_transcript, parse_transcript
from data_prep.recipe import Recipe, SourceConfig, validate_recipe
from data_prep.record import Record, Reject, reason_kind
from data_prep.split import UnionFind, assign_splits
from data_prep.steps.chat import AssembleStep, ChatFilterStep, CleanStep, DedupStep, RedactStep
from data_prep.steps.clean import clean_text
from data_prep.steps.dedup import Deduplicator
from data_prep.steps.filters import ChatThresholds, GopherThresholds, gopher_quality
from data_prep.steps.redact import redact
from data_prep.tokens import Lengths, distribution
from data_prep.writers import AtomicFile, JsonlWriter, check_output_dir, write_json

__all__ = ["build", "run_recipe", "Builder"]

log = logging.getLogger(__name__)

PAGE_FORMATS = ("html", "text", "transcript")
SPLITS = ("train", "val", "test")


def build(
    sources: list[str],
    output_dir: str | os.PathLike,
    *,
    system: str | None = None,
    val_fraction: float = 0.05,
    test_fraction: float = 0.1,
    seed: int = 0,
    workers: int = 1,
    format: str = "auto",  # noqa: A002 - mirrors the --format flag
    overwrite: bool = False,
    provenance: bool = True,
    tokenizer: str | os.PathLike | None = None,
    **recipe_overrides: Any,
) -> dict[str, Any]:
    """Run the same pipeline as `data-prep build` and return the report dict.

    `recipe_overrides` sets any other recipe section, e.g. `dedup={"threshold": 0.9}`.
    Raises `RecipeError` (all problems at once) or `OutputDirError` before doing any work.
    """
    data: dict[str, Any] = {
        "sources": [{"path": os.fspath(s), "format": format} for s in sources],
        "output_dir": os.fspath(output_dir),
        "system": system,
        "split": {"val_fraction": val_fraction, "test_fraction": test_fraction, "seed": seed},
        "workers": workers,
        "overwrite": overwrite,
        "provenance": provenance,
        "tokenizer": os.fspath(tokenizer) if tokenizer is not None else None,
        **recipe_overrides,
    }
    return run_recipe(validate_recipe(data))


def run_recipe(recipe: Recipe) -> dict[str, Any]:
    """Run a validated recipe (what `data-prep run` does after loading the YAML)."""
    return Builder(recipe).run()


@dataclass
class _File:
    path: str
    root: str
    fmt: str
    spec: SourceConfig


def _row_key_variants(key: str) -> list[str]:
    key = key.strip()
    out = [key, normalize_url(key)]
    if "://" not in key:
        out.append(os.path.basename(key))
    return out + _url_tree_keys(key)


_PAGE_SUFFIXES = (".html", ".htm", ".xhtml", ".shtml")


def _tree_key(path: str) -> str:
    """`a/b.html`, `a/b/index.html`, `a/b/` and `a/b` are one page to a crawler: key `tree:a/b`."""
    path = path.strip("/")
    low = path.lower()
    for suffix in _PAGE_SUFFIXES:
        if low.endswith(suffix):
            path = path[: -len(suffix)]
            break
    if path == "index" or path.endswith("/index"):
        path = path[: -len("index")].rstrip("/")
    return f"tree:{path}" if path else ""


def _url_tree_keys(url: str) -> list[str]:
    """Where a crawler saves the page at `url` under the scraped tree: below a `host/` directory
    (`wget -m`) or at the path itself when the tree is rooted at the host."""
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return []
    if not parts.scheme or not parts.netloc:
        return []
    host = parts.netloc.lower().removeprefix("www.")
    keys = []
    for path in dict.fromkeys((parts.path, unquote(parts.path))):
        # wget saves `page?x=1` as the file `page?x=1` (or `page?x=1.html` with -E)
        path = path.lstrip("/") + (f"?{parts.query}" if parts.query else "")
        keys += [_tree_key(f"{host}/{path}"), _tree_key(path)]
    return [k for k in dict.fromkeys(keys) if k]


def _file_tree_keys(rel: str) -> list[str]:
    """Tree keys of a file at `rel` under its source directory; a leading host directory is
    compared as a URL host is (lowercase, no `www.`)."""
    first, _, rest = rel.partition("/")
    keys = [_tree_key(rel)]
    if rest:
        keys.append(_tree_key(f"{first.lower().removeprefix('www.')}/{rest}"))
    return [k for k in dict.fromkeys(keys) if k]


class ContextStore:
    """Pages that annotations point at: join key -> doc id -> cleaned, redacted, trimmed text or error."""

    def __init__(self) -> None:
        self.referenced: set[str] = set()
        self.key_to_doc: dict[str, str] = {}
        self.docs: dict[str, tuple[str, str | None]] = {}  # doc id -> (text, error)

    def reference(self, key: str) -> None:
        self.referenced.update(_row_key_variants(key))

    def page_keys(self, path: str, root: str, urls: list[str]) -> list[str]:
        rel = os.path.relpath(path, root) if root else path
        rel = rel.replace(os.sep, "/")
        # a page without a canonical link still joins a row's URL by where the crawler saved it
        keys = [path, rel, os.path.basename(path), Path(path).stem, *urls, *_file_tree_keys(rel)]
        return [k for k in keys if k]

    def is_referenced(self, keys: list[str]) -> bool:
        return any(k in self.referenced for k in keys)

    def add(self, doc_id: str, keys: list[str], text: str, error: str | None) -> None:
        self.docs[doc_id] = (text, error)
        for k in keys:
            self.key_to_doc.setdefault(k, doc_id)

    def lookup(self, key: str) -> str | None:
        for k in _row_key_variants(key):
            if k in self.key_to_doc:
                return self.key_to_doc[k]
        return None


def _parse_many(paths: list[str], opts: ExtractOptions) -> list[Page]:
    return [parse_page(p, opts) for p in paths]


def _parallel_map(fn, paths: list[str], workers: int, chunk: int = 8) -> Iterator[Page]:
    """Ordered results of `fn` over chunks of paths, with a bounded number of chunks in flight.

    Pool.imap has no backpressure: when the main process (steps, dedup) is slower than the
    workers, finished pages pile up in memory and peak RSS grows with the corpus.
    """
    # fork: workers inherit the imported trafilatura/lxml instead of re-importing them
    ctx = multiprocessing.get_context("fork")
    chunks = (paths[i : i + chunk] for i in range(0, len(paths), chunk))
    with ctx.Pool(workers) as pool:
        pending: deque = deque()
        for c in chunks:
            pending.append(pool.apply_async(fn, (c,)))
            if len(pending) >= 4 * workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


class Builder:
    def __init__(self, recipe: Recipe) -> None:
        self.r = recipe
        self.lengths = Lengths(recipe.tokenizer)
        self.pii: Counter[str] = Counter()
        self.read_rejects: Counter[str] = Counter()
        self.records_in = 0
        self.by_source: Counter[str] = Counter()
        self.rejects_by_step: Counter[str] = Counter()
        self.rejects_by_reason: Counter[str] = Counter()
        self.contexts = ContextStore()
        self.context_pages = 0
        self.hidden_skipped = 0
        self.groups = UnionFind()
        self.group_sizes: Counter[str] = Counter()
        q = recipe.quality
        self.gopher = (
            GopherThresholds(**q.model_dump(exclude={"enabled", "context_action"})) if q.enabled else None
        )
        self.context_quality_flags: Counter[str] = Counter()
        d = recipe.dedup
        self.dedup = Deduplicator(
            d.exact, d.near, d.threshold, d.num_perm, d.shingle_size, near_action=d.near_action
        )
        self.timings: dict[str, float] = {}

    # ---- table of contents ------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        out = check_output_dir(self.r.output_dir, self.r.overwrite)
        files = self._discover()
        self.n_files = len(files)
        self._collect_join_keys(files)
        self.rejects = JsonlWriter(out / "rejects.jsonl")
        self.spool = AtomicFile(out / "spool.jsonl")
        writers: dict[str, JsonlWriter] = {}
        try:
            records = self._read(files)
            steps = [
                CleanStep(self.r.clean.fix_unicode),
                RedactStep(self.r.redact.types if self.r.redact.enabled else [], self.pii),
                ChatFilterStep(ChatThresholds(**self.r.chat_filter.model_dump())),
                AssembleStep(),
                DedupStep(self.dedup, on_near_match=self.groups.union),
            ]
            for step in steps:
                records = step.run(records, self._reject_record)
            n_kept = 0
            for rec in records:
                self._spool(rec)
                n_kept += 1
            self.timings["read_and_steps_s"] = time.perf_counter() - t0
            self.spool.fh.flush()
            writers = {s: JsonlWriter(out / f"{s}.jsonl") for s in SPLITS}
            split_report, leakage, lengths = self._split_and_write(writers)
            report = self._report(steps, split_report, leakage, lengths, writers)
            for w in writers.values():
                w.commit()
            self.rejects.commit()
            report["timings"]["total_s"] = round(time.perf_counter() - t0, 3)
            write_json(out / "report.json", report)
        except BaseException:
            for w in writers.values():
                w.discard()
            self.rejects.discard()
            raise
        finally:
            self.spool.discard()
        return report

    # ---- sources --------------------------------------------------------------------
    def _discover(self) -> list[_File]:
        files = []
        for spec in self.r.sources:
            found, hidden = discover(spec.path)
            self.hidden_skipped += hidden
            files += [_File(p, root, detect_format(p, spec.format), spec) for p, root in found]
        # report counts per SOURCE argument, not per file: 20,000 pages are one line
        self.spec_of = {f.path: f.spec.path for f in files}
        return files

    def _collect_join_keys(self, files: list[_File]) -> None:
        """First pass over annotated sources: which pages are context documents, not examples."""
        for f in files:
            if f.fmt not in TABLE_FORMATS:
                continue
            mapping = self._mapping(f.spec)
            try:
                for _, row in read_table(f.path, f.fmt):
                    # a chat-format record's "url" is metadata, not a join
                    if isinstance(row, dict) and detect_kind(row) not in ("openai", "sharegpt"):
                        key = join_keys_of_row(row, mapping)
                        if key:
                            self.contexts.reference(key)
            except Exception as err:  # noqa: BLE001 - reported per row in the second pass
                log.debug("join-key pass failed on %s: %s", f.path, err)

    def _read(self, files: list[_File]) -> Iterator[Record]:
        """Pages and texts first (they fill the context store), then annotated rows."""
        pages = [f for f in files if f.fmt == "html"]
        yield from self._counted(self._read_pages(pages))
        for f in files:
            if f.fmt in ("text", "transcript"):
                yield from self._counted(self._read_text(f))
        for f in files:
            if f.fmt in TABLE_FORMATS:
                yield from self._counted(self._read_rows(f))

    def _counted(self, items: Iterable[Record | Reject]) -> Iterator[Record]:
        for item in items:
            self.records_in += 1
            self.by_source[self.spec_of.get(item.source, item.source)] += 1
            if isinstance(item, Reject):
                self._write_reject(item)
            else:
                yield item

    # ---- pages ------------------------------------------------------------------------
    def _read_pages(self, files: list[_File]) -> Iterator[Record | Reject]:
        opts = ExtractOptions(**self.r.extraction.model_dump(), fix_unicode=self.r.clean.fix_unicode)
        parse = partial(parse_page, opts=opts)
        paths = [f.path for f in files]
        t0 = time.perf_counter()
        # disable=None: a bar on a terminal, silence in CI logs and tests
        bar = tqdm(total=len(paths), desc="pages", unit="page", disable=None, leave=False)
        if self.r.workers > 1 and len(paths) > 1:
            pages = _parallel_map(partial(_parse_many, opts=opts), paths, self.r.workers)
            for f, page in zip(files, pages):
                bar.update()
                yield from self._page_records(f, page)
        else:
            for f, path in zip(files, paths):
                bar.update()
                yield from self._page_records(f, parse(path))
        bar.close()
        self.timings["pages_s"] = time.perf_counter() - t0
        self.timings["pages"] = len(paths)

    def _page_records(self, f: _File, page: Page) -> Iterator[Record | Reject]:
        keys = self.contexts.page_keys(f.path, f.root, page.urls)
        group = f"doc:{f.path}"
        if self.contexts.is_referenced(keys):
            self.context_pages += 1
            error = page.error
            if error is None and not page.text:
                error = "no_main_text"
            yield from self._store_context(f.path, keys, page.text, error, page.snippet)
        elif page.error:
            yield Reject(f.path, "page", "read", page.error, text=page.snippet or None)
            return
        elif not page.qa:
            yield Reject(f.path, "page", "read", "no_chat_structure", text=page.text or page.snippet)
            return
        for i, (q, a, _kind) in enumerate(page.qa, start=1):
            yield Record(
                source=f.path,
                locator=f"qa={i}",
                messages=self._with_system(
                    [{"role": "user", "content": q}, {"role": "assistant", "content": a}], f.spec
                ),
                group=group,
            )

    def _store_context(
        self, path: str, keys: list[str], text: str, error: str | None, snippet: str
    ) -> Iterator[Reject]:
        """A page some annotation points at: clean, redact, quality-check and trim it once."""
        if error is None:
            text = redact(text, self.r.redact.types if self.r.redact.enabled else (), self.pii)
            if self.gopher is not None:
                error = gopher_quality(text, self.gopher)
                if error and self.r.quality.context_action == "warn":
                    self.context_quality_flags[reason_kind(error)] += 1
                    log.info("context page %s kept despite %s", path, error)
                    error = None
        if error is None:
            text = self.lengths.trim(text, self.r.context.budget)
            # consumed as context, never yielded: not an input record of its own
            self.contexts.add(path, keys, text, None)
            return
        self.contexts.add(path, keys, "", error)
        yield Reject(path, "page", "context", error, text=text or snippet or None)

    # ---- plain text and transcripts --------------------------------------------------
    def _read_text(self, f: _File) -> Iterator[Record | Reject]:
        try:
            with open(f.path, "rb") as fh:
                text = decode_bytes(fh.read())
        except DecodeError as err:
            text, error = "", str(err)
        except OSError as err:
            text, error = "", f"unreadable: {err.strerror}"
        else:
            error = None
        keys = self.contexts.page_keys(f.path, f.root, [])
        speakers = self.r.transcript.speakers
        if self.contexts.is_referenced(keys):
            self.context_pages += 1
            yield from self._store_context(
                f.path, keys, clean_text(text, self.r.clean.fix_unicode), error, text[:300]
            )
            return
        if error:
            yield Reject(f.path, "file", "read", error)
            return
        if f.fmt != "transcript" and not looks_like_transcript(text, speakers):
            yield Reject(f.path, "file", "read", "no_chat_structure", text=text)
            return
        for i, (line, conv) in enumerate(parse_transcript(text, speakers), start=1):
            loc = f"conversation={i},line={line}"
            if isinstance(conv, str):
                yield Reject(f.path, loc, "read", conv)
                continue
            bad = gopher_quality("\n".join(m["content"] for m in conv), self.gopher) if self.gopher else None
            if bad:
                yield Reject(f.path, loc, "quality", bad, record={"messages": conv})
            else:
                yield Record(f.path, loc, self._with_system(conv, f.spec), group=f"doc:{f.path}")

    # ---- annotated rows ---------------------------------------------------------------
    def _mapping(self, spec: SourceConfig) -> ColumnMapping:
        return ColumnMapping(**spec.columns.model_dump())

    def _read_rows(self, f: _File) -> Iterator[Record | Reject]:
        mapping = self._mapping(f.spec)
        strict = f.fmt in ("json", "jsonl")
        try:
            for loc, row in read_table(f.path, f.fmt):
                if isinstance(row, str):
                    yield Reject(f.path, loc, "read", row)
                    continue
                try:
                    yield self._row_record(f, loc, row, convert_row(row, mapping, strict))
                except RowError as err:
                    yield Reject(f.path, loc, "convert", str(err), record=row)
        except DecodeError as err:
            yield Reject(f.path, "file", "read", str(err))
        except Exception as err:  # noqa: BLE001 - a corrupt xlsx/zip must not stop the other sources
            yield Reject(f.path, "file", "read", f"unreadable: {type(err).__name__}: {err}")

    def _row_record(self, f: _File, loc: str, row: dict, conv: Converted) -> Record | Reject:
        rec = Record(source=f.path, locator=loc, group=f"row:{f.path}#{loc}")
        if conv.messages:  # OpenAI / ShareGPT: already a conversation
            rec.messages = self._with_system(conv.messages, f.spec)
            return rec
        rec.messages = self._with_system(
            [{"role": "user", "content": conv.question}, {"role": "assistant", "content": conv.answer}],
            f.spec,
            conv.system,
        )
        if conv.join_key:
            doc_id = self.contexts.lookup(conv.join_key)
            if doc_id is None:
                return Reject(f.path, loc, "join", f"page_not_found: {conv.join_key}", record=row)
            text, error = self.contexts.docs[doc_id]
            if error:
                return Reject(f.path, loc, "join", f"context_unavailable: {doc_id}: {error}", record=row)
            rec.context, rec.context_ready = text, True
            if conv.context.strip():
                rec.context = f"{text}\n\n{conv.context}"
                rec.context_ready = False
            rec.group = rec.context_key = f"doc:{doc_id}"
        elif conv.context.strip():
            rec.context = conv.context
            digest = hashlib.blake2b(" ".join(conv.context.split()).encode(), digest_size=12).hexdigest()
            rec.context_key = f"ctx:{digest}"
        return rec

    def _with_system(self, messages: list[dict], spec: SourceConfig, row_system: str = "") -> list[dict]:
        if any(m["role"] == "system" for m in messages):
            return messages
        system = row_system.strip() or spec.system or self.r.system
        return [{"role": "system", "content": system}, *messages] if system else messages

    # ---- rejects, spool, split ------------------------------------------------------
    def _write_reject(self, rej: Reject) -> None:
        self.rejects_by_step[rej.step] += 1
        self.rejects_by_reason[reason_kind(rej.reason)] += 1
        self.rejects.write(rej.to_json())

    def _reject_record(self, rec: Record, step: str, reason: str) -> None:
        self._write_reject(Reject(rec.source, rec.locator, step, reason, record={"messages": rec.messages}))

    def _spool(self, rec: Record) -> None:
        root = self.groups.find(rec.group)
        self.group_sizes[root] += 1
        self.spool.write(
            json.dumps([rec.id, rec.group, rec.messages, rec.source, rec.locator], ensure_ascii=False) + "\n"
        )

    def _split_and_write(self, writers: dict[str, JsonlWriter]) -> tuple[dict, dict, dict]:
        sizes: Counter[str] = Counter()
        for g, n in self.group_sizes.items():
            sizes[self.groups.find(g)] += n
        assignment = assign_splits(
            sizes, self.r.split.val_fraction, self.r.split.test_fraction, self.r.split.seed
        )
        # Per kept record only compact arrays: its split as one byte at its dedup index number, and
        # token lengths as 32-bit ints (what grows with the corpus besides the dedup index).
        split_code = bytearray(self.dedup.size)
        codes = {s: i + 1 for i, s in enumerate(SPLITS)}
        test_nums = array("q")
        lengths: dict[str, array] = defaultdict(lambda: array("I"))
        with open(self.spool.tmp, encoding="utf-8") as fh:
            for line in fh:
                rec_id, group, messages, source, locator = json.loads(line)
                split = assignment[self.groups.find(group)]
                if self.r.dedup.near:
                    n = self.dedup.number(rec_id)
                    if n is not None:
                        split_code[n] = codes[split]
                        if split == "test":
                            test_nums.append(n)
                obj: dict[str, Any] = {"messages": messages}
                if self.r.provenance:
                    obj["meta"] = {"source": source, "locator": locator}
                writers[split].write(obj)
                lengths[split].append(sum(self.lengths.count(m["content"]) for m in messages))
        # leakage check: independent of how the split was made, look for near-duplicate pairs
        # with one side in test and the other in train
        pairs = []
        for n in test_nums:
            rec_id = self.dedup.id_of(n)
            for other in self.dedup.neighbours(rec_id):
                m = self.dedup.number(other)
                if m is not None and split_code[m] == codes["train"]:
                    pairs.append([rec_id, other])
        leakage = {"near_dup_pairs_test_train": len(pairs), "pairs": pairs[:20]}
        groups_per_split = Counter(assignment.values())
        split_report = {
            "seed": self.r.split.seed,
            "val_fraction": self.r.split.val_fraction,
            "test_fraction": self.r.split.test_fraction,
            "groups": {s: groups_per_split.get(s, 0) for s in SPLITS},
        }
        return split_report, leakage, {s: distribution(lengths[s]) for s in SPLITS}

    def _report(self, steps, split_report, leakage, lengths, writers) -> dict[str, Any]:
        counts = {s: writers[s].count for s in SPLITS}
        rejected = self.rejects.count
        clusters = self.dedup.clusters
        return {
            "outputs": {s: f"{s}.jsonl" for s in (*SPLITS, "rejects")},
            "counts": {**counts, "rejects": rejected},
            "accounting": {
                "records_in": self.records_in,
                "out": sum(counts.values()) + rejected,
                "balanced": self.records_in == sum(counts.values()) + rejected,
            },
            "inputs": {
                "files": self.n_files,
                "context_pages": self.context_pages,
                "context_pages_failing_quality": dict(self.context_quality_flags),
                "hidden_files_skipped": self.hidden_skipped,
                "records_by_source": dict(sorted((k, v) for k, v in self.by_source.items() if v)),
            },
            "steps": {s.name: s.stats() for s in steps},
            "rejects_by_step": dict(sorted(self.rejects_by_step.items())),
            "rejects_by_reason": dict(sorted(self.rejects_by_reason.items())),
            "pii": {k: self.pii.get(k, 0) for k in ("email", "phone", "ip", "card")},
            "dedup": {
                "threshold": self.r.dedup.threshold,
                "exact_duplicates": steps[-1].dropped.get("duplicate", 0),
                "near_duplicates": steps[-1].dropped.get("near_duplicate", 0) + steps[-1].kept_near,
                "near_duplicates_kept_same_split": steps[-1].kept_near,
                "clusters": len(clusters),
                "largest_cluster": 1 + max(clusters.values(), default=0) if clusters else 0,
            },
            "split": split_report,
            "leakage": leakage,
            "lengths": {"unit": self.lengths.unit, **lengths},
            "timings": {k: round(v, 3) if isinstance(v, float) else v for k, v in self.timings.items()},
        }
