"""`engine: ray`: the pipeline of data_prep.pipeline on a Ray cluster, with the local engine's results.

Table of contents (`run_on_ray`); the driver plans and decides, the cluster does the work:

    driver   plan the files (numbered in processing order); join keys of annotated files (tasks)
    1 map    pages and texts -> DocWork.process -> records, rejects, context pages, counters
    driver   context pages -> ContextStore, in document order (what rows join on)
    2 map    annotated files -> DocWork.process with that store
    3 shuffle exact dedup: groupby(digest) -> count and first (in document order) per digest;
             digests with copies -> driver (the copies are rejected naming the first)
    4 shuffle near dedup: band hashes of every signature -> groupby(band hash, context key) ->
             count per bucket; the records of buckets of two or more -> driver: candidate
             pairs, confirmed on the two full signatures -> edges. A preference build compares
             prompts across prompt groups (data_prep.preference): a bucket counts when it holds
             two groups, and each group is represented by its first record
    driver   resolve_near on the edges (the local rule: drop, or join split groups) and union-find
             on the joined groups
    5 map    records per split key (partial counts) -> driver: SplitCuts
    6 map    every line's output (train/val/test/rejects) and its JSON; lines per output and run
             of items -> driver: shards as ranges in document order of about `ray.shard_records` lines
    7 shuffle groupby(output, shard): each shard sorted by document order and written
    driver   manifest.json per output, report.json

Every order that matters is the document order of pipeline.order_key, never the order in which
blocks arrive, so the outputs are the local engine's line for line and do not change with the
number of workers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections import Counter
from typing import Any

import numpy as np

from data_prep import storage
from data_prep.pipeline import (
    SEQ_BITS,
    SPLITS,
    ContextStore,
    DocWork,
    SourceFile,
    Tally,
    dedup_report,
    example_json,
    join_keys_of,
    make_report,
    order_key,
    plan_sources,
    split_report,
)
from data_prep.prompts import PROMPT_KEYED_TASKS
from data_prep.recipe import Recipe
from data_prep.record import Record, Reject
from data_prep.split import SplitCuts, UnionFind, split_cuts, split_key
from data_prep.steps.dedup import (
    Deduplicator,
    NearEdge,
    best_first,
    duplicate_reason,
    resolve_near,
    similarity,
)
from data_prep.tokens import Lengths, distribution_of_counts
from data_prep.writers import SHARD_DIRS, check_output_url, shard_name, write_manifest, write_shard

__all__ = ["run_on_ray"]

INSTALL = "the ray engine needs Ray Data: pip install 'finetune-kit[ray]' (or: pip install 'ray[data]')"
NODE_WAIT_S = 600  # ray.wait_for_nodes: long enough for a Slurm or KubeRay worker to start
PAGES_PER_TASK = 32  # ~0.1 s of extraction each: enough to amortize a task, small enough to balance


def _col(name: str):
    """A column in a Ray Data filter expression (imported here: Ray is optional)."""
    from ray.data.expressions import col

    return col(name)


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as err:
        raise ImportError(INSTALL) from err
    return ray


# ---- columns ----------------------------------------------------------------------------------
# One schema for everything the per-file maps emit, so that their outputs can be unioned:
# kind is "record", "reject" (line = the reject's JSON), "context" or "tally" (line = JSON; id =
# the node that ran the task).
def _item_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("order", pa.int64()),
            ("kind", pa.string()),
            ("id", pa.string()),
            ("group", pa.string()),
            ("ctx", pa.string()),
            ("source", pa.string()),
            ("locator", pa.string()),
            ("line", pa.string()),  # record: its example (Record.example) as JSON
            ("length", pa.int64()),
            ("digest", pa.binary()),
            ("sig", pa.binary()),  # num_perm x uint32; null without words or without near dedup
        ]
    )


# ---- per worker process: the heavy objects of a build, built once per process ---------------
_CACHE: dict[str, Any] = {}


def _cached(token: str, make):
    if token not in _CACHE:
        _CACHE.clear()  # a worker process serves one build at a time
        _CACHE[token] = make()
    return _CACHE[token]


class _Worker:
    """What a map task needs: the per-file work and the dedup features."""

    def __init__(self, recipe: Recipe, contexts: ContextStore) -> None:
        self.work = DocWork(recipe, contexts)
        d = recipe.dedup
        self.dedup = Deduplicator(d.exact, d.near, d.threshold, d.num_perm, d.shingle_size)


# ---- 1, 2: read + per-record steps ------------------------------------------------------------
def _process_files(batch, *, token: str, recipe: Recipe, files: list[SourceFile], contexts: ContextStore):
    import pyarrow as pa
    import ray

    w: _Worker = _cached(token, lambda: _Worker(recipe, contexts))
    rows: dict[str, list] = {name: [] for name in _item_schema().names}
    total = Tally()

    def add(**kw) -> None:
        for name in rows:
            rows[name].append(kw.get(name))

    for number in batch.column("number").to_pylist():
        f = files[number]
        fo = w.work.process(f)
        total.merge(fo.tally)
        for doc_id, keys, text, error in fo.contexts:
            add(order=order_key(f.number, 0), kind="context", line=json.dumps([doc_id, keys, text, error]))
        for seq, item in fo.items:
            order = order_key(f.number, seq)
            if isinstance(item, Reject):
                add(order=order, kind="reject", line=json.dumps(item.to_json(), ensure_ascii=False))
                continue
            add(**_record_columns(w, item, order))
    add(order=-1, kind="tally", id=ray.get_runtime_context().get_node_id(), line=total.to_json())
    return pa.table(rows, schema=_item_schema())


def _record_columns(w: _Worker, rec: Record, order: int) -> dict[str, Any]:
    sig = w.dedup.signature(rec.near_text()) if w.dedup.near else None
    return {
        "order": order,
        "kind": "record",
        "id": rec.id,
        "group": rec.group,
        "ctx": rec.context_key,
        "source": rec.source,
        "locator": rec.locator,
        "line": json.dumps(rec.body(), ensure_ascii=False),  # the record's body (Record.body)
        "length": w.work.record_length(rec),
        "digest": rec.exact_key() if w.dedup.exact else None,
        "sig": None if sig is None else sig.tobytes(),
    }


def _join_keys(batch, *, files: list[SourceFile]):
    import pyarrow as pa

    keys = [k for n in batch.column("number").to_pylist() for k in join_keys_of(files[n])]
    return pa.table({"key": pa.array(keys, pa.string())})


# ---- 3: exact dedup -----------------------------------------------------------------------------
# digest (hex) -> (document order, id) of the first record with it, for the digests with copies
Exact = dict[str, tuple[int, str]]


def _first_keys(batch):
    """The digest, and document order + id as one string: its minimum names the first record."""
    import pyarrow as pa

    orders, ids = batch.column("order").to_pylist(), batch.column("id").to_pylist()
    # hex: Ray's aggregation sorts its keys, and it keeps bytes values as pickled objects
    digests = [d.hex() for d in batch.column("digest").to_pylist()]
    return pa.table(
        {
            "digest": pa.array(digests, pa.string()),
            "first": pa.array([f"{o:020d} {i}" for o, i in zip(orders, ids)]),
        }
    )


def _copy_of(digest: bytes | None, order: int, exact: Exact) -> str | None:
    """The id of the record this one is an exact copy of, or None."""
    first = exact.get(digest.hex()) if digest is not None and exact else None
    return first[1] if first is not None and first[0] != order else None


# ---- 4: near dedup ------------------------------------------------------------------------------
def _ctx_salt(ctx: str) -> int:
    return int.from_bytes(hashlib.blake2b(ctx.encode(), digest_size=8).digest(), "big")


def _bucket_rows(batch, *, token: str, recipe: Recipe, exact: Exact):
    """One row per band of every signature (exact copies excluded, as locally): bucket = band hash
    mixed with the context key, so that only records of one context key share a bucket (a rare
    collision of two keys only adds a candidate, which the confirmation rejects). With a `group`
    column in the batch (a preference build), each row also names its split group."""
    import pyarrow as pa

    w: _Worker = _cached(token, lambda: _Worker(recipe, ContextStore()))
    by_group = "group" in batch.column_names
    buckets, orders, groups = [], [], []
    names = ("order", "ctx", "sig", "digest", "group") if by_group else ("order", "ctx", "sig", "digest")
    cols = [batch.column(n).to_pylist() for n in names]
    for order, ctx, sig, digest, *group in zip(*cols):
        if sig is None or _copy_of(digest, order, exact) is not None:
            continue
        hashes = w.dedup.band_hashes(np.frombuffer(sig, np.uint32)) ^ np.uint64(_ctx_salt(ctx))
        # as int64 (the same bits): Ray's aggregation keeps uint64 keys above 2^63 as Python objects
        buckets.append(hashes.view(np.int64))
        orders.append(np.full(len(hashes), order, np.int64))
        groups += group * len(hashes)
    out = {
        "bucket": pa.array(np.concatenate(buckets) if buckets else np.empty(0, np.int64), pa.int64()),
        "order": pa.array(np.concatenate(orders) if orders else np.empty(0, np.int64), pa.int64()),
    }
    if by_group:
        out["group"] = pa.array(groups, pa.string())
    return pa.table(out)


def _in_buckets(batch, *, buckets: np.ndarray):
    return batch.filter(np.isin(batch.column("bucket").to_numpy(), buckets))


def _candidates(batch, *, orders: np.ndarray):
    """The records of candidate pairs, with what confirming and resolving them needs."""
    keep = np.isin(batch.column("order").to_numpy(), orders)
    return batch.filter(keep).select(["order", "id", "group", "ctx", "sig"])


# ---- 5: split -----------------------------------------------------------------------------------
def _split_keys(batch, *, roots: dict[str, str], seed: int, dropped: set[int], exact: Exact):
    """Records per split key in this block (a partial count; the driver adds the blocks)."""
    import pyarrow as pa

    keys: Counter[int] = Counter()
    cols = (batch.column(n).to_pylist() for n in ("order", "group", "digest"))
    for order, group, digest in zip(*cols):
        if order not in dropped and _copy_of(digest, order, exact) is None:
            keys[split_key(seed, roots.get(group, group))] += 1
    return pa.table(
        {"key": pa.array(list(keys), pa.uint64()), "n": pa.array(list(keys.values()), pa.int64())}
    )


# ---- 6: what each line becomes ------------------------------------------------------------------
def _finalize(
    batch,
    *,
    roots: dict[str, str],
    seed: int,
    cuts: SplitCuts,
    dropped: dict[int, str],
    exact: Exact,
    provenance: bool,
    unit_bits: int,
):
    import pyarrow as pa

    dest, lines, lengths = [], [], []
    cols = {
        n: batch.column(n).to_pylist()
        for n in ("order", "kind", "group", "source", "locator", "line", "length", "digest")
    }
    for order, kind, group, source, locator, line, length, digest in zip(*cols.values()):
        if kind == "reject":
            dest.append("rejects")
            lines.append(line)
            lengths.append(0)
            continue
        body = json.loads(line)
        first = _copy_of(digest, order, exact)
        reason = duplicate_reason(first) if first is not None else dropped.get(order)
        if reason is not None:
            rej = Reject(source, locator, "dedup", reason, record=body)
            dest.append("rejects")
            lines.append(json.dumps(rej.to_json(), ensure_ascii=False))
            lengths.append(0)
            continue
        dest.append(cuts.split_of(split_key(seed, roots.get(group, group))))
        lines.append(json.dumps(example_json(body, source, locator, provenance), ensure_ascii=False))
        lengths.append(length)
    orders = np.asarray(cols["order"], np.int64)
    return pa.table(
        {
            "order": pa.array(orders, pa.int64()),
            "unit": pa.array(orders >> unit_bits, pa.int64()),
            "dest": pa.array(dest, pa.string()),
            "line": pa.array(lines, pa.string()),
            "length": pa.array(lengths, pa.int64()),
        }
    )


def _lines_per_unit(batch):
    import pyarrow as pa

    counts = Counter(zip(batch.column("unit").to_pylist(), batch.column("dest").to_pylist()))
    return pa.table(
        {
            "unit": pa.array([f for f, _ in counts], pa.int64()),
            "dest": pa.array([d for _, d in counts], pa.string()),
            "n": pa.array(list(counts.values()), pa.int64()),
        }
    )


def unit_bits(shard_records: int) -> int:
    """Shards are cut between units: runs of 2^bits consecutive items of one file (a whole file
    when it holds fewer). A unit is at most a quarter of a shard, so a shard holds between
    `shard_records` and 1.25 x as many lines, and a large annotation file spans many shards."""
    return min(SEQ_BITS, max(0, shard_records.bit_length() - 3))


def shard_starts(lines_per_unit: dict[int, int], shard_records: int) -> np.ndarray:
    """First unit of each shard: units in document order, a new shard once one holds
    `shard_records` lines."""
    starts, filled = [], shard_records
    for u in sorted(lines_per_unit):
        if filled >= shard_records:
            starts.append(u)
            filled = 0
        filled += lines_per_unit[u]
    return np.asarray(starts, np.int64)


def _with_shard(batch, *, starts: dict[str, np.ndarray]):
    import pyarrow as pa

    units = batch.column("unit").to_numpy()
    dest = batch.column("dest").to_pylist()
    shard = np.empty(len(dest), np.int64)
    for d in set(dest):
        mask = np.array([x == d for x in dest])
        shard[mask] = np.searchsorted(starts[d], units[mask], "right") - 1
    return batch.append_column("shard", pa.array(shard, pa.int64()))


def _write_group(group, *, out: str):
    """One (output, shard): its lines in document order, written; its manifest entry."""
    import pyarrow as pa

    group = group.sort_by("order")
    dest = group.column("dest")[0].as_py()
    shard = group.column("shard")[0].as_py()
    entry = write_shard(storage.join(out, dest, shard_name(shard)), group.column("line").to_pylist())
    hist = Counter(group.column("length").to_pylist()) if dest in SPLITS else Counter()
    return pa.table(
        {
            "dest": [dest],
            "entry": [json.dumps(entry)],
            "lengths": [json.dumps(sorted(hist.items()))],
        }
    )


# ---- the driver ----------------------------------------------------------------------------------
class _Stages:
    """tqdm on the driver, one step per stage, and each stage's wall time for the report."""

    NAMES = ("plan", "read pages", "read annotations", "exact dedup", "near dedup", "split", "write")

    def __init__(self) -> None:
        from tqdm import tqdm

        # disable=None: a bar on a terminal, silence in CI logs and tests
        self.bar = tqdm(
            total=len(self.NAMES), desc="data-prep (ray)", unit="stage", disable=None, leave=False
        )
        self.seconds: dict[str, float] = {}
        self.t = time.perf_counter()

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self.t, 3)
        self.t = now
        self.bar.set_postfix_str(name)
        self.bar.update()

    def close(self) -> None:
        self.bar.close()


def _connect(ray, address: str | None) -> bool:
    """Join or start Ray; True when this call started it (and so shuts it down)."""
    if ray.is_initialized():
        return False
    # Unset: RAY_ADDRESS when Ray set it (a driver of `ray job submit`), else a new Ray in this
    # process; never silently a cluster some earlier `ray start` left running on this machine.
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    return True


def run_on_ray(recipe: Recipe) -> dict[str, Any]:
    """Run a validated recipe on Ray and return the report (the local engine's, with shard
    directories as outputs)."""
    ray = _import_ray()
    started = _connect(ray, recipe.ray.address)
    ctx = ray.data.DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.shuffle_strategy)
    # Ray Data logs every execution plan at INFO; a build runs about twenty of them
    data_log = logging.getLogger("ray.data")
    saved_level = data_log.level
    data_log.setLevel(max(saved_level, logging.WARNING))
    # Ray's own per-operator bars only on a terminal; the stage bar below is the summary
    ctx.enable_progress_bars = sys.stderr.isatty()
    ctx.shuffle_strategy = {
        "sort": ray.data.context.ShuffleStrategy.SORT_SHUFFLE_PULL_BASED,
        "hash": ray.data.context.ShuffleStrategy.HASH_SHUFFLE,
    }[recipe.ray.shuffle]
    try:
        return _Run(ray, recipe).run()
    finally:
        ctx.enable_progress_bars, ctx.shuffle_strategy = saved
        data_log.setLevel(saved_level)
        if started:
            ray.shutdown()


def _wait_for_nodes(ray, n: int, timeout_s: float = NODE_WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while (alive := sum(node["Alive"] for node in ray.nodes())) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the Ray cluster has {alive} of the {n} nodes of ray.wait_for_nodes after {timeout_s:.0f} s; "
                "check that `ray start --address ...` ran on every node"
            )
        time.sleep(1.0)


class _Run:
    def __init__(self, ray, recipe: Recipe) -> None:
        self.ray, self.rd, self.r = ray, ray.data, recipe
        if recipe.ray.wait_for_nodes:
            _wait_for_nodes(ray, recipe.ray.wait_for_nodes)
        # the parallelism follows the CPUs present now: nodes that join later get no blocks
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.p = recipe.ray.parallelism or max(1, cpus)
        self.token = f"{time.time_ns()}-{id(self)}"
        self.stages = _Stages()
        self.read_nodes: set[str] = set()

    # ---- table of contents ------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        r = self.r
        check_output_url(r.output_dir, r.overwrite)
        plan = plan_sources(r)
        contexts = ContextStore()
        tables = [f for f in plan.files if f.fmt not in ("html", "text", "transcript")]
        # a preference or prompts build joins no pages
        for key in self._join_keys(plan.files, tables if r.task not in PROMPT_KEYED_TASKS else []):
            contexts.reference(key)
        self.stages.done("plan")
        tally = Tally()
        docs = [f for f in plan.files if f.fmt in ("html", "text", "transcript")]
        first = self._read("pages", plan.files, docs, contexts, tally, PAGES_PER_TASK)
        self.stages.done("read pages")
        pages_s = self.stages.seconds["read pages"]
        second = self._read("rows", plan.files, tables, contexts, tally, 1)
        self.stages.done("read annotations")
        parts = [d for d in (first, second) if d is not None]
        items = (parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]).materialize() if parts else None
        rejects = items.filter(expr=_col("kind") == "reject") if items is not None else None
        records = items.filter(expr=_col("kind") == "record").materialize() if items is not None else None
        n_records = records.count() if records is not None else 0
        if not n_records:
            records = None  # nothing to deduplicate or split (a shuffle of nothing is an error)

        exact, exact_reps, n_exact = self._exact(records)
        self.stages.done("exact dedup")
        outcome, edges = self._near(records, exact)
        self.stages.done("near dedup")
        # Union-find on the joined groups, on the driver: only near-duplicate edges join groups
        # (a document's own records share its group by name), and edges are few compared with
        # documents, so the forest fits on one machine where the records would not.
        uf = UnionFind()
        for a, b in outcome.unions:
            uf.union(a, b)
        roots = {g: uf.find(g) for g in uf.parent}
        cuts, groups_per_split = self._cuts(records, roots, set(outcome.dropped), exact)
        self.stages.done("split")
        lines = rejects if records is None else rejects.union(records)
        manifests, hist = self._write(lines, roots, cuts, outcome.dropped, exact)
        self.stages.done("write")
        self.stages.close()

        n_near = len(outcome.dropped)
        dropped = {k: v for k, v in (("duplicate", n_exact), ("near_duplicate", n_near)) if v}
        tally.steps["dedup"] = {"in": n_records, "out": n_records - n_exact - n_near, "dropped": dropped}
        tally.rejects_by_step.update({"dedup": n_exact + n_near} if n_exact + n_near else {})
        tally.rejects_by_reason.update(dropped)
        clusters = Counter(exact_reps)
        clusters.update(outcome.matched)
        counts = {d: manifests[d]["records"] for d in SHARD_DIRS}
        report = make_report(
            task=r.task,
            tally=tally,
            counts={**{s: counts[s] for s in SPLITS}, "rejects": counts["rejects"]},
            outputs={d: f"{d}/" for d in SHARD_DIRS},
            n_files=len(plan.files),
            hidden_skipped=plan.hidden_skipped,
            dedup=dedup_report(r.dedup.threshold, tally.steps, outcome.kept_near, dict(clusters)),
            split=split_report(r, groups_per_split),
            leakage=self._leakage(edges, outcome.dropped, roots, cuts),
            lengths={
                "unit": Lengths(r.tokenizer).unit,
                **{s: distribution_of_counts(hist[s]) for s in SPLITS},
            },
            timings={
                "read_and_steps_s": self.stages.seconds["read pages"]
                + self.stages.seconds["read annotations"],
                "pages_s": pages_s,
                "pages": sum(f.fmt == "html" for f in plan.files),
                "stages_s": self.stages.seconds,
            },
        )
        report["engine"] = {
            "name": "ray",
            "parallelism": self.p,
            "nodes": sum(n["Alive"] for n in self.ray.nodes()),
            "nodes_that_read": len(self.read_nodes),
        }
        report["timings"]["total_s"] = round(time.perf_counter() - t0, 3)
        storage.write_bytes(
            storage.join(r.output_dir, "report.json"),
            (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode("utf-8"),
        )
        return report

    # ---- stages -----------------------------------------------------------------------
    def _files_ds(self, files: list[SourceFile]):
        return self.rd.from_items(
            [{"number": f.number} for f in files], override_num_blocks=min(self.p, len(files))
        )

    def _join_keys(self, all_files: list[SourceFile], tables: list[SourceFile]) -> list[str]:
        if not tables:
            return []
        ds = self._files_ds(tables).map_batches(
            _join_keys,
            batch_size=1,
            batch_format="pyarrow",
            fn_kwargs={"files": all_files},
            compute=self.rd.TaskPoolStrategy(size=self.p),
        )
        return [row["key"] for row in ds.take_all()]

    def _read(self, stage: str, all_files, files, contexts: ContextStore, tally: Tally, per_task: int):
        """Files -> items (materialized); their context pages join `contexts` in document order,
        their counters `tally`."""
        if not files:
            return None
        per_task = max(1, min(per_task, -(-len(files) // self.p)))
        ds = (
            self._files_ds(files)
            .map_batches(
                _process_files,
                batch_size=per_task,
                batch_format="pyarrow",
                fn_kwargs={
                    "token": f"{self.token}-{stage}",
                    "recipe": self.r,
                    "files": all_files,
                    "contexts": contexts,
                },
                compute=self.rd.TaskPoolStrategy(size=self.p),
            )
            .materialize()
        )
        side = ds.filter(expr=(_col("kind") == "context") | (_col("kind") == "tally")).take_all()
        for row in sorted(side, key=lambda row: row["order"]):
            if row["kind"] == "tally":
                tally.merge(Tally.from_json(row["line"]))
                self.read_nodes.add(row["id"])
            else:
                contexts.add(*json.loads(row["line"]))
        return ds.filter(expr=(_col("kind") == "record") | (_col("kind") == "reject"))

    def _exact(self, records) -> tuple[Exact, dict[str, int], int]:
        """(the digests with copies, kept id -> its copies, number of copies)."""
        from ray.data.aggregate import Count, Min

        if records is None or not self.r.dedup.exact:
            return {}, {}, 0
        rows = (
            records.select_columns(["digest", "order", "id"])
            .map_batches(_first_keys, batch_format="pyarrow")
            .groupby("digest", num_partitions=self.p)
            .aggregate(Count(alias_name="n"), Min("first", alias_name="first"))
            .filter(expr=_col("n") > 1)
            .take_all()
        )
        exact: Exact = {}
        reps: dict[str, int] = {}
        for row in rows:
            order, rec_id = row["first"].split(" ", 1)
            exact[row["digest"]] = (int(order), rec_id)
            reps[rec_id] = row["n"] - 1
        return exact, reps, sum(reps.values())

    def _near(self, records, exact: Exact):
        """resolve_near's outcome on the corpus's confirmed edges (and the edges).

        The shuffle is a count per bucket; only the records of buckets of two or more, the
        candidates, reach the driver, where each pair is confirmed on the two full signatures (as
        the local index confirms its candidates). Candidates are the near-duplicates plus the
        band collisions of LSH tuned for recall: few compared with documents, and each is 512
        bytes of signature, so confirming them in one place costs less than two more shuffles.
        """
        from ray.data.aggregate import Count, Max, Min

        from data_prep.steps.dedup import NearOutcome

        if records is None or not self.r.dedup.near:
            return NearOutcome(), []
        # A preference build compares prompts across prompt groups only; every record of a group
        # has the group's one signature, so it lands in the group's buckets.
        by_group = self.r.task in PROMPT_KEYED_TASKS
        columns = ["order", "ctx", "sig", "digest"] + (["group"] if by_group else [])
        rows = records.select_columns(columns).map_batches(
            _bucket_rows,
            batch_format="pyarrow",
            fn_kwargs={"token": f"{self.token}-bands", "recipe": self.r, "exact": exact},
        )
        rows = rows.materialize()
        grouped = rows.groupby("bucket", num_partitions=self.p)
        if by_group:  # a bucket of two groups or more: their smallest and largest names differ
            grouped = grouped.aggregate(Min("group", alias_name="lo"), Max("group", alias_name="hi"))
            shared = grouped.filter(expr=_col("lo") != _col("hi")).take_all()
        else:
            shared = grouped.aggregate(Count(alias_name="n")).filter(expr=_col("n") > 1).take_all()
        if not shared:
            return resolve_near([], self.r.dedup.near_action), []
        buckets = np.asarray(sorted(row["bucket"] for row in shared), np.int64)
        members: dict[int, list[int]] = {}
        in_shared = rows.map_batches(_in_buckets, batch_format="pyarrow", fn_kwargs={"buckets": buckets})
        if by_group:
            # one row per group and bucket, its first record: a prompt asked by many pairs costs the
            # driver one row, and the group is represented as the local engine indexes it
            in_shared = in_shared.groupby(["bucket", "group"], num_partitions=self.p).aggregate(
                Min("order", alias_name="order")
            )
        for row in in_shared.take_all():
            members.setdefault(row["bucket"], []).append(row["order"])
        pairs = {(a, b) for orders in members.values() for a in orders for b in orders if a < b}
        involved = np.asarray(sorted({o for pair in pairs for o in pair}), np.int64)
        nodes = {
            row["order"]: row
            for row in records.map_batches(
                _candidates, batch_format="pyarrow", fn_kwargs={"orders": involved}
            ).take_all()
        }
        edges = []
        for a, b in sorted(pairs):
            na, nb = nodes[a], nodes[b]
            if na["ctx"] != nb["ctx"]:
                continue  # two context keys whose buckets collided
            est = similarity(np.frombuffer(na["sig"], np.uint32), np.frombuffer(nb["sig"], np.uint32))
            if est >= self.r.dedup.threshold:
                edges.append(NearEdge(a, b, est, na["id"], nb["id"], na["group"], nb["group"]))
        return resolve_near(edges, self.r.dedup.near_action), edges

    def _cuts(
        self, records, roots: dict[str, str], dropped: set[int], exact: Exact
    ) -> tuple[SplitCuts, Counter]:
        s = self.r.split
        if records is None:
            return SplitCuts(), Counter()
        parts = (
            records.select_columns(["order", "group", "digest"])
            .map_batches(
                _split_keys,
                batch_format="pyarrow",
                fn_kwargs={"roots": roots, "seed": s.seed, "dropped": dropped, "exact": exact},
            )
            .take_all()
        )
        keys = np.asarray([p["key"] for p in parts], np.uint64)
        sizes = np.asarray([p["n"] for p in parts], np.int64)
        cuts = split_cuts(keys, sizes, s.val_fraction, s.test_fraction)
        return cuts, Counter(cuts.split_of(int(k)) for k in np.unique(keys))

    def _write(self, lines, roots, cuts: SplitCuts, dropped: dict[int, str], exact: Exact):
        """Every line (records and rejects) to its output and shard; the manifests and the
        length histograms of the splits."""
        r = self.r
        hist: dict[str, Counter] = {s: Counter() for s in SPLITS}
        entries: dict[str, list[dict]] = {d: [] for d in SHARD_DIRS}
        final = None
        if lines is not None:
            final = lines.map_batches(
                _finalize,
                batch_format="pyarrow",
                fn_kwargs={
                    "roots": roots,
                    "seed": r.split.seed,
                    "cuts": cuts,
                    "dropped": dropped,
                    "exact": exact,
                    "provenance": r.provenance,
                    "unit_bits": unit_bits(r.ray.shard_records),
                },
            ).materialize()
        if final is not None and final.count():
            per: dict[str, Counter] = {d: Counter() for d in SHARD_DIRS}
            for row in final.map_batches(_lines_per_unit, batch_format="pyarrow").take_all():
                per[row["dest"]][row["unit"]] += row["n"]
            starts = {d: shard_starts(per[d], r.ray.shard_records) for d in SHARD_DIRS}
            # about one shard per partition: a reduce task holds its partition whole, so fewer
            # partitions than shards would make a worker's memory grow with the corpus
            n_shards = sum(len(v) for v in starts.values())
            written = (
                final.map_batches(_with_shard, batch_format="pyarrow", fn_kwargs={"starts": starts})
                .groupby(["dest", "shard"], num_partitions=max(self.p, n_shards))
                .map_groups(_write_group, batch_format="pyarrow", fn_kwargs={"out": r.output_dir})
                .take_all()
            )
            for row in written:
                entries[row["dest"]].append(json.loads(row["entry"]))
                if row["dest"] in SPLITS:
                    hist[row["dest"]].update(dict(json.loads(row["lengths"])))
        manifests = {d: write_manifest(storage.join(r.output_dir, d), d, entries[d]) for d in SHARD_DIRS}
        return manifests, hist

    def _leakage(self, edges: list[NearEdge], dropped: dict[int, str], roots, cuts: SplitCuts) -> dict:
        """The local engine's independent check: near-duplicate pairs of kept records with one
        side in test and the other in train, listed by the test record's document order."""
        seed = self.r.split.seed

        def split_of(group: str) -> str:
            return cuts.split_of(split_key(seed, roots.get(group, group)))

        found = []
        for e in edges:
            if e.a in dropped or e.b in dropped:
                continue
            sa, sb = split_of(e.a_group), split_of(e.b_group)
            if {sa, sb} == {"test", "train"}:
                test, other = ((e.a, e.a_id), e.b_id) if sa == "test" else ((e.b, e.b_id), e.a_id)
                found.append((test[0], best_first((e.est, other)), [test[1], other]))
        pairs = [p for *_, p in sorted(found)]
        return {"near_dup_pairs_test_train": len(pairs), "pairs": pairs[:20]}
