"""The data-prep pipeline, expressed once; `data_prep.build` (one machine) and
`data_prep.ray_engine` (a Ray cluster) both run it.

    plan_sources(recipe)        input files in processing order, each with its number
    join_keys_of(file)          what annotation rows point at: those pages become context
    DocWork.process(file)       everything that happens to one file before dedup: read, then per
                                record clean -> redact -> chat filter -> assemble (-> preference,
                                in a preference build: data_prep.preference). Returns a
                                FileOutput: records, rejects with their reasons, context pages
                                and the counters of the report (Tally)
    make_report(...)            report.json, from what either engine counted

Order: item k of file n (a record or a reject) has the document order (n, k). The local engine
handles items in exactly that order, so "the first copy" of a duplicate, the order of the lines
in every output file and the context page a join key names are functions of the inputs, not of
which worker finished first; the Ray engine sorts by the same key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from data_prep.convert import ColumnMapping, Converted, RowError, convert_row, detect_kind, join_keys_of_row
from data_prep.preference import (
    PREFERENCE_TASKS,
    PreferenceChatFilterStep,
    PreferenceColumns,
    PreferenceStep,
    preference_record,
)
from data_prep.prompts import PROMPTS_TASK, PromptChatFilterStep, PromptRedactStep, PromptStep, prompt_example
from data_prep.readers import detect_format, discover
from data_prep.readers.decode import DecodeError, decode_bytes
from data_prep.readers.html import ExtractOptions, Page, normalize_url, parse_page
from data_prep.readers.tables import TABLE_FORMATS, read_table
from data_prep.readers.text import looks_like_transcript, parse_transcript
from data_prep.recipe import PAIR_COLUMNS, UNPAIRED_COLUMNS, Recipe, SourceConfig
from data_prep.record import Record, Reject, reason_kind
from data_prep.steps.base import Step, add_stats
from data_prep.steps.chat import AssembleStep, ChatFilterStep, CleanStep, RedactStep
from data_prep.steps.clean import clean_text
from data_prep.steps.filters import ChatThresholds, GopherThresholds, gopher_quality
from data_prep.steps.redact import redact
from data_prep.tokens import Lengths

__all__ = [
    "SPLITS",
    "ContextStore",
    "DocWork",
    "FileOutput",
    "SourceFile",
    "Tally",
    "example_json",
    "join_keys_of",
    "make_report",
    "order_key",
    "plan_sources",
]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SEQ_BITS = 32  # items per file below 2^32; files below 2^31


def order_key(file_number: int, seq: int) -> int:
    """Document order of item `seq` of file `file_number`, as one int64."""
    return (file_number << SEQ_BITS) | seq


def source_name(path: str, root: str) -> str:
    """A file's path relative to the input it was found under (the directory or glob base given,
    or the file's own directory): what names its split groups, so that a build of the same data
    splits it the same wherever the data lives (another checkout, another machine, a temp dir)."""
    rel = os.path.relpath(path, root) if root else path
    return rel.replace(os.sep, "/")


@dataclass
class SourceFile:
    path: str
    root: str
    fmt: str
    spec: SourceConfig
    number: int = 0  # position in processing order

    @property
    def name(self) -> str:
        return source_name(self.path, self.root)


@dataclass
class Plan:
    files: list[SourceFile]
    hidden_skipped: int


def plan_sources(recipe: Recipe) -> Plan:
    """Every input file, numbered in processing order: pages, then texts and transcripts, then
    annotated files (rows join pages, so pages must be known first)."""
    found, hidden = [], 0
    for spec in recipe.sources:
        paths, n_hidden = discover(spec.path)
        hidden += n_hidden
        found += [SourceFile(p, root, detect_format(p, spec.format), spec) for p, root in paths]
    ordered = (
        [f for f in found if f.fmt == "html"]
        + [f for f in found if f.fmt in ("text", "transcript")]
        + [f for f in found if f.fmt in TABLE_FORMATS]
    )
    for i, f in enumerate(ordered):
        f.number = i
    return Plan(ordered, hidden)


def _mapping(spec: SourceConfig) -> ColumnMapping:
    return ColumnMapping(**spec.columns.model_dump(exclude={*PAIR_COLUMNS, *UNPAIRED_COLUMNS}))


def join_keys_of(f: SourceFile) -> list[str]:
    """Join keys of an annotated file's rows (first pass: which pages are context documents)."""
    keys: list[str] = []
    mapping = _mapping(f.spec)
    try:
        for _, row in read_table(f.path, f.fmt):
            # a chat-format record's "url" is metadata, not a join
            if isinstance(row, dict) and detect_kind(row) not in ("openai", "sharegpt"):
                key = join_keys_of_row(row, mapping)
                if key:
                    keys.append(key)
    except Exception as err:  # noqa: BLE001 - reported per row in the second pass
        log.debug("join-key pass failed on %s: %s", f.path, err)
    return keys


# ---- join keys: how a row's page reference matches a page ------------------------------------
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
        self.names: dict[str, str] = {}  # doc id -> its source_name, which names its split group

    def reference(self, key: str) -> None:
        self.referenced.update(_row_key_variants(key))

    def page_keys(self, path: str, root: str, urls: list[str]) -> list[str]:
        """A page's join keys; the first two are its path and its source_name (see `add`)."""
        rel = source_name(path, root)
        # a page without a canonical link still joins a row's URL by where the crawler saved it
        keys = [path, rel, os.path.basename(path), Path(path).stem, *urls, *_file_tree_keys(rel)]
        return [k for k in keys if k]

    def is_referenced(self, keys: list[str]) -> bool:
        return any(k in self.referenced for k in keys)

    def add(self, doc_id: str, keys: list[str], text: str, error: str | None) -> None:
        """`keys` are `page_keys(doc_id, ...)`: keys[1] is the page's source_name."""
        self.docs[doc_id] = (text, error)
        self.names[doc_id] = keys[1]
        for k in keys:
            self.key_to_doc.setdefault(k, doc_id)

    def lookup(self, key: str) -> str | None:
        for k in _row_key_variants(key):
            if k in self.key_to_doc:
                return self.key_to_doc[k]
        return None


# ---- counters ---------------------------------------------------------------------------------
STEP_NAMES = ("clean", "redact", "chat_filter", "assemble", "dedup")
# the report lists the steps in pipeline order, a preference build's own step included
STEP_ORDER = ("clean", "redact", "chat_filter", "assemble", "preference", "dedup")
_COUNTERS = ("by_source", "rejects_by_step", "rejects_by_reason", "pii", "context_quality_flags")


@dataclass
class Tally:
    """What the report counts, for one file or a whole build; `merge` adds two of them."""

    records_in: int = 0
    by_source: Counter = field(default_factory=Counter)
    rejects_by_step: Counter = field(default_factory=Counter)
    rejects_by_reason: Counter = field(default_factory=Counter)
    pii: Counter = field(default_factory=Counter)
    context_pages: int = 0
    context_quality_flags: Counter = field(default_factory=Counter)
    # step name -> Step.stats(), in step order; a step that saw nothing is still listed
    steps: dict[str, dict] = field(
        default_factory=lambda: {n: {"in": 0, "out": 0, "dropped": {}} for n in STEP_NAMES}
    )

    def reject(self, rej: Reject) -> None:
        self.rejects_by_step[rej.step] += 1
        self.rejects_by_reason[reason_kind(rej.reason)] += 1

    def add_steps(self, steps: list[Step]) -> None:
        for s in steps:
            self.steps[s.name] = add_stats(self.steps.get(s.name, {}), s.stats())

    def merge(self, other: Tally) -> None:
        self.records_in += other.records_in
        self.context_pages += other.context_pages
        for name in _COUNTERS:
            getattr(self, name).update(getattr(other, name))
        for name, stats in other.steps.items():
            self.steps[name] = add_stats(self.steps.get(name, {}), stats)

    def to_json(self) -> str:
        return json.dumps({f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def from_json(cls, text: str) -> Tally:
        d = json.loads(text)
        return cls(**{k: Counter(v) if k in _COUNTERS else v for k, v in d.items()})


@dataclass
class FileOutput:
    """What one file gave: items in document order (seq, Record | Reject), the context pages it
    holds (doc id, join keys, text, error) and its counters."""

    number: int
    items: list[tuple[int, Record | Reject]] = field(default_factory=list)
    contexts: list[tuple[str, list[str], str, str | None]] = field(default_factory=list)
    tally: Tally = field(default_factory=Tally)


def example_json(body: dict[str, Any], source: str, locator: str, provenance: bool) -> dict[str, Any]:
    """One line of train/val/test.jsonl: a record's body (Record.body) and its provenance."""
    obj: dict[str, Any] = dict(body)
    if provenance:
        obj["meta"] = {"source": source, "locator": locator}
    return obj


# ---- the per-file work ---------------------------------------------------------------------------
class DocWork:
    """Read one input file and run the per-record steps on what it holds.

    `contexts` is the store of context pages: the join keys annotation rows reference (enough
    for pages and texts), plus the stored pages themselves for annotated files. Counters go to
    the FileOutput, never to this object, so that any number of workers can each hold one.
    """

    def __init__(self, recipe: Recipe, contexts: ContextStore) -> None:
        self.r = recipe
        self.contexts = contexts
        self.lengths = Lengths(recipe.tokenizer)
        q = recipe.quality
        self.gopher = (
            GopherThresholds(**q.model_dump(exclude={"enabled", "context_action"})) if q.enabled else None
        )
        self.opts = ExtractOptions(**recipe.extraction.model_dump(), fix_unicode=recipe.clean.fix_unicode)
        self.redact_types = tuple(recipe.redact.types) if recipe.redact.enabled else ()
        self.preference = recipe.task in PREFERENCE_TASKS
        self.prompts = recipe.task == PROMPTS_TASK

    def steps(self, pii: Counter) -> list[Step]:
        thresholds = ChatThresholds(**self.r.chat_filter.model_dump())
        if self.prompts:
            return [
                CleanStep(self.r.clean.fix_unicode),
                PromptRedactStep(list(self.redact_types), pii),
                PromptChatFilterStep(thresholds),
                AssembleStep(),
                PromptStep(),
            ]
        if self.preference:
            # the SFT steps on every message of prompt, chosen and rejected, then the pair's own check
            return [
                CleanStep(self.r.clean.fix_unicode),
                RedactStep(list(self.redact_types), pii),
                PreferenceChatFilterStep(thresholds),
                AssembleStep(),
                PreferenceStep(),
            ]
        return [
            CleanStep(self.r.clean.fix_unicode),
            RedactStep(list(self.redact_types), pii),
            ChatFilterStep(thresholds),
            AssembleStep(),
        ]

    def parse(self, f: SourceFile) -> Page:
        return parse_page(f.path, self.opts)

    def process(self, f: SourceFile, page: Page | None = None) -> FileOutput:
        """`page`: an HTML file already parsed (by a worker process of the local engine)."""
        out = FileOutput(f.number)
        tally = out.tally
        steps = self.steps(tally.pii)
        if self.preference:
            items = self._read_preference(f)
        elif self.prompts:
            items = self._read_prompts(f)
        elif f.fmt == "html":
            items = self._page_records(f, page if page is not None else self.parse(f), out)
        elif f.fmt in ("text", "transcript"):
            items = self._read_text(f, out)
        else:
            items = self._read_rows(f)
        for seq, item in enumerate(items):
            tally.records_in += 1
            tally.by_source[f.spec.path] += 1
            if isinstance(item, Record):
                item = self._run_steps(steps, item)
            if isinstance(item, Reject):
                tally.reject(item)
            out.items.append((seq, item))
        tally.add_steps(steps)
        return out

    def _run_steps(self, steps: list[Step], rec: Record) -> Record | Reject:
        for step in steps:
            reason = step.apply(rec)
            if reason is not None:
                return Reject(rec.source, rec.locator, step.name, reason, record=rec.body())
        return rec

    def record_length(self, rec: Record) -> int:
        """Length of a kept example, in the report's unit (words, or tokens with a tokenizer)."""
        return rec.length(self.lengths.count)

    # ---- pages ------------------------------------------------------------------------------
    def _page_records(self, f: SourceFile, page: Page, out: FileOutput) -> Iterator[Record | Reject]:
        keys = self.contexts.page_keys(f.path, f.root, page.urls)
        group = f"doc:{f.name}"
        if self.contexts.is_referenced(keys):
            out.tally.context_pages += 1
            error = page.error
            if error is None and not page.text:
                error = "no_main_text"
            yield from self._store_context(f.path, keys, page.text, error, page.snippet, out)
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
        self, path: str, keys: list[str], text: str, error: str | None, snippet: str, out: FileOutput
    ) -> Iterator[Reject]:
        """A page some annotation points at: clean, redact, quality-check and trim it once."""
        if error is None:
            text = redact(text, self.redact_types, out.tally.pii)
            if self.gopher is not None:
                error = gopher_quality(text, self.gopher)
                if error and self.r.quality.context_action == "warn":
                    out.tally.context_quality_flags[reason_kind(error)] += 1
                    log.info("context page %s kept despite %s", path, error)
                    error = None
        if error is None:
            text = self.lengths.trim(text, self.r.context.budget)
            # consumed as context, never yielded: not an input record of its own
            out.contexts.append((path, keys, text, None))
            return
        out.contexts.append((path, keys, "", error))
        yield Reject(path, "page", "context", error, text=text or snippet or None)

    # ---- plain text and transcripts -----------------------------------------------------------
    def _read_text(self, f: SourceFile, out: FileOutput) -> Iterator[Record | Reject]:
        from data_prep import storage

        try:
            text = decode_bytes(storage.read_bytes(f.path))
        except DecodeError as err:
            text, error = "", str(err)
        except OSError as err:
            text, error = "", f"unreadable: {storage.os_reason(err)}"
        else:
            error = None
        keys = self.contexts.page_keys(f.path, f.root, [])
        speakers = self.r.transcript.speakers
        if self.contexts.is_referenced(keys):
            out.tally.context_pages += 1
            yield from self._store_context(
                f.path, keys, clean_text(text, self.r.clean.fix_unicode), error, text[:300], out
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
                yield Record(f.path, loc, self._with_system(conv, f.spec), group=f"doc:{f.name}")

    # ---- annotated rows -----------------------------------------------------------------------
    def _read_rows(self, f: SourceFile) -> Iterator[Record | Reject]:
        mapping = _mapping(f.spec)
        strict = f.fmt in ("json", "jsonl")
        return self._rows(f, lambda loc, row: self._row_record(f, loc, row, convert_row(row, mapping, strict)))

    def _read_preference(self, f: SourceFile) -> Iterator[Record | Reject]:
        """A preference build reads annotated rows only (data_prep.preference)."""
        if f.fmt not in TABLE_FORMATS:
            return iter([Reject(f.path, "file", "read", f"not_a_preference_source: a {f.fmt} file; a preference "
                                "build reads rows of CSV, TSV, XLSX, JSON or JSONL files")])
        cols = PreferenceColumns.of(f.spec.columns)
        strict, unpaired = f.fmt in ("json", "jsonl"), self.r.task == "kto"
        system = f.spec.system or self.r.system
        return self._rows(f, lambda loc, row: preference_record(f.path, loc, row, cols, strict=strict,
                                                                unpaired=unpaired, system=system))

    def _read_prompts(self, f: SourceFile) -> Iterator[Record | Reject]:
        """A prompts build reads annotated rows only (data_prep.prompts)."""
        if f.fmt not in TABLE_FORMATS:
            return iter([Reject(f.path, "file", "read", f"not_a_prompt_source: a {f.fmt} file; a prompts build "
                                "reads rows of CSV, TSV, XLSX, JSON or JSONL files")])
        mapping, strict = _mapping(f.spec), f.fmt in ("json", "jsonl")
        system = f.spec.system or self.r.system
        return self._rows(f, lambda loc, row: prompt_example(f.path, loc, row, mapping, strict=strict, system=system,
                                                            provenance=self.r.provenance))

    def _rows(self, f: SourceFile, record_of) -> Iterator[Record | Reject]:
        """`record_of(locator, row)` for each row of an annotated file; a row it refuses (RowError)
        and a row or file that cannot be read are rejects."""
        try:
            for loc, row in read_table(f.path, f.fmt):
                if isinstance(row, str):
                    yield Reject(f.path, loc, "read", row)
                    continue
                try:
                    yield record_of(loc, row)
                except RowError as err:
                    yield Reject(f.path, loc, "convert", str(err), record=row)
        except DecodeError as err:
            yield Reject(f.path, "file", "read", str(err))
        except Exception as err:  # noqa: BLE001 - a corrupt xlsx/zip must not stop the other sources
            yield Reject(f.path, "file", "read", f"unreadable: {type(err).__name__}: {err}")

    def _row_record(self, f: SourceFile, loc: str, row: dict, conv: Converted) -> Record | Reject:
        rec = Record(source=f.path, locator=loc, group=f"row:{f.name}#{loc}", tools=conv.tools,
                     parallel_tool_calls=conv.parallel_tool_calls)
        if conv.messages:  # OpenAI / ShareGPT: already a conversation
            rec.messages = self._with_system(conv.messages, f.spec)
            return rec
        answer: dict[str, Any] = {"role": "assistant", "content": conv.answer}
        if conv.tool_calls:
            answer = {"role": "assistant", "content": conv.answer or None, "tool_calls": conv.tool_calls}
        rec.messages = self._with_system(
            [{"role": "user", "content": conv.question}, answer],
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
            # the page's own QA records (group doc:NAME) and every row quoting it share a split
            rec.group = f"doc:{self.contexts.names[doc_id]}"
            rec.context_key = f"doc:{doc_id}"
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


# ---- the report -------------------------------------------------------------------------------
def dedup_report(threshold: float, steps: dict[str, dict], kept_near: int, clusters: dict[str, int]) -> dict:
    dropped = steps["dedup"]["dropped"]
    return {
        "threshold": threshold,
        "exact_duplicates": dropped.get("duplicate", 0),
        "near_duplicates": dropped.get("near_duplicate", 0) + kept_near,
        "near_duplicates_kept_same_split": kept_near,
        "clusters": len(clusters),
        "largest_cluster": 1 + max(clusters.values(), default=0) if clusters else 0,
    }


def make_report(
    *,
    task: str,
    tally: Tally,
    counts: dict[str, int],
    outputs: dict[str, str],
    n_files: int,
    hidden_skipped: int,
    dedup: dict,
    split: dict,
    leakage: dict,
    lengths: dict,
    timings: dict[str, Any],
) -> dict[str, Any]:
    out = sum(counts.values())
    steps = {n: tally.steps[n] for n in STEP_ORDER if n in tally.steps}
    return {
        "task": task,
        "outputs": outputs,
        "counts": counts,
        "accounting": {
            "records_in": tally.records_in,
            "out": out,
            "balanced": tally.records_in == out,
        },
        "inputs": {
            "files": n_files,
            "context_pages": tally.context_pages,
            "context_pages_failing_quality": dict(tally.context_quality_flags),
            "hidden_files_skipped": hidden_skipped,
            "records_by_source": dict(sorted((k, v) for k, v in tally.by_source.items() if v)),
        },
        "steps": {**steps, **{n: s for n, s in tally.steps.items() if n not in steps}},
        "rejects_by_step": dict(sorted(tally.rejects_by_step.items())),
        "rejects_by_reason": dict(sorted(tally.rejects_by_reason.items())),
        "pii": {k: tally.pii.get(k, 0) for k in ("email", "phone", "ip", "card")},
        "dedup": dedup,
        "split": split,
        "leakage": leakage,
        "lengths": lengths,
        "timings": {k: round(v, 3) if isinstance(v, float) else v for k, v in timings.items()},
    }


def split_report(recipe: Recipe, groups_per_split: Counter) -> dict:
    return {
        "seed": recipe.split.seed,
        "val_fraction": recipe.split.val_fraction,
        "test_fraction": recipe.split.test_fraction,
        "groups": {s: groups_per_split.get(s, 0) for s in SPLITS},
    }
