"""`build`: sources -> train/val/test/rejects JSONL + report, the whole data-prep pipeline.

`run_recipe` runs it on this machine (`engine: local`, this module) or on a Ray cluster
(`engine: ray`, data_prep.ray_engine); both run the steps of data_prep.pipeline.

The local engine reads as a table of contents (`Builder.run`): check output dir -> collect join
keys -> per file, in order: read + per-record steps (pipeline.DocWork), then exact and near dedup
on a streaming index -> spool -> split -> write -> report. Memory holds the dedup index, the split
groups and the pages that annotations join on; the corpus itself streams through a spool file in
the output dir.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from array import array
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterator
from typing import Any

from tqdm import tqdm

from data_prep.pipeline import (
    SPLITS,
    ContextStore,
    DocWork,
    FileOutput,
    SourceFile,
    Tally,
    dedup_report,
    example_json,
    join_keys_of,
    make_report,
    plan_sources,
    split_report,
)
from data_prep.preference import PromptDedupStep
from data_prep.prompts import PROMPT_KEYED_TASKS
from data_prep.readers.html import Page
from data_prep.recipe import Recipe, validate_recipe
from data_prep.record import Record, Reject
from data_prep.split import UnionFind, assign_splits
from data_prep.steps.chat import DedupStep
from data_prep.steps.dedup import Deduplicator
from data_prep.tokens import distribution
from data_prep.writers import AtomicFile, JsonlWriter, check_output_dir, write_json
from kitcore.integrity import digest_files, write_manifest

__all__ = ["build", "run_recipe", "Builder"]


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
    if recipe.engine == "ray":
        from data_prep.ray_engine import run_on_ray

        return run_on_ray(recipe)
    return Builder(recipe).run()


# The DocWork of the running build, for pool workers: fork hands it to them without pickling
# (its tokenizer and join-key set would otherwise be pickled with every chunk).
_FORKED_WORK: DocWork | None = None


def _parse_many(files: list[SourceFile]) -> list[Page]:
    assert _FORKED_WORK is not None
    return [_FORKED_WORK.parse(f) for f in files]


def _parallel_map(fn: Callable[[list], list], items: list, workers: int, chunk: int = 8) -> Iterator:
    """Ordered results of `fn` over chunks of items, with a bounded number of chunks in flight.

    Pool.imap has no backpressure: when the main process (steps, dedup) is slower than the
    workers, finished pages pile up in memory and peak RSS grows with the corpus.
    """
    # fork: workers inherit the imported trafilatura/lxml instead of re-importing them
    ctx = multiprocessing.get_context("fork")
    chunks = (items[i : i + chunk] for i in range(0, len(items), chunk))
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
        self.tally = Tally()
        self.contexts = ContextStore()
        self.groups = UnionFind()
        self.group_sizes: Counter[str] = Counter()
        d = recipe.dedup
        self.dedup_step: DedupStep | PromptDedupStep
        if recipe.task in PROMPT_KEYED_TASKS:
            self.dedup_step = PromptDedupStep(
                d.exact, d.near, d.threshold, d.num_perm, d.shingle_size, on_near_match=self.groups.union
            )
            self.dedup = self.dedup_step.index  # the prompts: what the leakage check compares
        else:
            self.dedup = Deduplicator(
                d.exact, d.near, d.threshold, d.num_perm, d.shingle_size, near_action=d.near_action
            )
            self.dedup_step = DedupStep(self.dedup, on_near_match=self.groups.union)
        self.timings: dict[str, float] = {}

    # ---- table of contents ------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        out = check_output_dir(self.r.output_dir, self.r.overwrite)
        plan = plan_sources(self.r)
        for f in plan.files:
            # a preference or prompts build joins no pages
            if f.fmt not in ("html", "text", "transcript") and self.r.task not in PROMPT_KEYED_TASKS:
                for key in join_keys_of(f):
                    self.contexts.reference(key)
        self.work = DocWork(self.r, self.contexts)
        self.rejects = JsonlWriter(out / "rejects.jsonl")
        self.spool = AtomicFile(out / "spool.jsonl")
        writers: dict[str, JsonlWriter] = {}
        try:
            for fo in self._processed(plan.files):
                self._consume(fo)
            self.tally.steps["dedup"] = self.dedup_step.stats()
            self.timings["read_and_steps_s"] = time.perf_counter() - t0
            self.spool.fh.flush()
            writers = {s: JsonlWriter(out / f"{s}.jsonl") for s in SPLITS}
            split, leakage, lengths = self._split_and_write(writers)
            counts = {**{s: writers[s].count for s in SPLITS}, "rejects": self.rejects.count}
            report = make_report(
                task=self.r.task,
                tally=self.tally,
                counts=counts,
                outputs={s: f"{s}.jsonl" for s in (*SPLITS, "rejects")},
                n_files=len(plan.files),
                hidden_skipped=plan.hidden_skipped,
                dedup=dedup_report(
                    self.r.dedup.threshold, self.tally.steps, self.dedup_step.kept_near, self.dedup_step.clusters
                ),
                split=split,
                leakage=leakage,
                lengths={"unit": self.work.lengths.unit, **lengths},
                timings=self.timings,
            )
            for w in writers.values():
                w.commit()
            self.rejects.commit()
            report["engine"] = {"name": "local", "workers": self.r.workers}
            report["timings"]["total_s"] = round(time.perf_counter() - t0, 3)
            write_json(out / "report.json", report)
            # Last: each output's checksum (kitcore.integrity), verified when `finetune` reads it.
            names = [f"{s}.jsonl" for s in (*SPLITS, "rejects")] + ["report.json"]
            write_manifest(out, files=digest_files(out, names))
        except BaseException:
            for w in writers.values():
                w.discard()
            self.rejects.discard()
            raise
        finally:
            self.spool.discard()
        return report

    # ---- read + per-record steps, file by file, in order -----------------------------------
    def _processed(self, files: list[SourceFile]) -> Iterator[FileOutput]:
        global _FORKED_WORK
        pages = [f for f in files if f.fmt == "html"]
        t0 = time.perf_counter()
        # disable=None: a bar on a terminal, silence in CI logs and tests
        bar = tqdm(total=len(pages), desc="pages", unit="page", disable=None, leave=False)
        # a preference or prompts build rejects pages unread: nothing to extract in worker processes
        if self.r.workers > 1 and len(pages) > 1 and self.r.task not in PROMPT_KEYED_TASKS:
            _FORKED_WORK = self.work
            try:
                for f, page in zip(pages, _parallel_map(_parse_many, pages, self.r.workers)):
                    bar.update()
                    yield self.work.process(f, page)
            finally:
                _FORKED_WORK = None
        else:
            for f in pages:
                bar.update()
                yield self.work.process(f)
        bar.close()
        self.timings["pages_s"] = time.perf_counter() - t0
        self.timings["pages"] = len(pages)
        for f in files[len(pages) :]:
            yield self.work.process(f)

    def _consume(self, fo: FileOutput) -> None:
        """A file's context pages join the store (rows of later files look them up); its records
        go through dedup into the spool; every reject is written."""
        for ctx in fo.contexts:
            self.contexts.add(*ctx)
        self.tally.merge(fo.tally)
        for _, item in fo.items:
            if isinstance(item, Record):
                reason = self.dedup_step.apply(item)
                if reason is None:
                    self._spool(item)
                    continue
                item = Reject(item.source, item.locator, "dedup", reason, record=item.body())
                self.tally.reject(item)
            self.rejects.write(item.to_json())

    # ---- spool, split ------------------------------------------------------------------
    def _spool(self, rec: Record) -> None:
        root = self.groups.find(rec.group)
        self.group_sizes[root] += 1
        line = [rec.id, rec.group, rec.body(), rec.source, rec.locator, self.work.record_length(rec)]
        self.spool.write(json.dumps(line, ensure_ascii=False) + "\n")

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
                rec_id, group, body, source, locator, length = json.loads(line)
                split = assignment[self.groups.find(group)]
                if self.r.dedup.near:
                    n = self.dedup.number(rec_id)
                    if n is not None:
                        split_code[n] = codes[split]
                        if split == "test":
                            test_nums.append(n)
                writers[split].write(example_json(body, source, locator, self.r.provenance))
                lengths[split].append(length)
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
        split = split_report(self.r, Counter(assignment.values()))
        return split, leakage, {s: distribution(lengths[s]) for s in SPLITS}

