"""`--engine ray` against `--engine local`: the same inputs give the same records, splits, rejects
and report, whatever the number of Ray workers; the shard directories it writes train.

One in-process Ray (2 CPUs) serves the whole module: its start-up is most of the cost.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
from dp_fixtures import write_mixed

from data_prep.build import build
from data_prep.cli import main
from data_prep.recipe import RecipeError

ray = pytest.importorskip("ray")

OUTPUTS = ("train", "val", "test", "rejects")
ARGS = dict(test_fraction=0.2, val_fraction=0.1, seed=3)
# reports differ only in these: where the outputs are, how long it took, and what ran it
ENGINE_KEYS = ("outputs", "timings", "engine")


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[Path]:
    return write_mixed(tmp_path_factory.mktemp("corpus"))


def shard_lines(out: Path, name: str) -> bytes:
    """An output of the Ray engine, its shards concatenated in manifest order."""
    manifest = json.loads((out / name / "manifest.json").read_text())
    assert [s["file"] for s in manifest["shards"]] == sorted(p.name for p in (out / name).glob("part-*.jsonl"))
    data = b"".join((out / name / s["file"]).read_bytes() for s in manifest["shards"])
    assert manifest["records"] == data.count(b"\n") == sum(s["records"] for s in manifest["shards"])
    return data


def same_report(a: dict, b: dict) -> None:
    a, b = ({k: v for k, v in r.items() if k not in ENGINE_KEYS} for r in (a, b))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == b[k], k


@pytest.fixture(scope="module")
def runs(ray_session, corpus, tmp_path_factory) -> dict:
    """Each near_action through the local engine and through Ray with 1 and with 2 workers."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for action in ("drop", "group"):
        dedup = {"near_action": action}
        out[action, "local"] = root / f"{action}-local", build(corpus, root / f"{action}-local", dedup=dedup, **ARGS)
        for p in (1, 2):
            d = root / f"{action}-ray{p}"
            rep = build(corpus, d, dedup=dedup, engine="ray", ray={"parallelism": p, "shard_records": 25}, **ARGS)
            out[action, p] = d, rep
    return out


@pytest.mark.parametrize("action", ["drop", "group"])
def test_ray_engine_gives_the_local_engines_results(runs, action) -> None:
    local, local_report = runs[action, "local"]
    ray_out, ray_report = runs[action, 2]
    for name in OUTPUTS:
        # same kept records, in the same split, in the same order; same rejects with the same reasons
        assert shard_lines(ray_out, name) == (local / f"{name}.jsonl").read_bytes(), name
    same_report(local_report, ray_report)
    assert ray_report["engine"]["name"] == "ray" and ray_report["outputs"]["train"] == "train/"
    assert json.loads((ray_out / "report.json").read_text())["counts"] == local_report["counts"]
    # the corpus exercises what must agree: every kind of reject and of duplicate
    assert set(local_report["rejects_by_step"]) >= {"read", "convert", "join", "chat_filter", "dedup"}
    d = local_report["dedup"]
    # the near-duplicate triples' copies, and the copied tool chat
    assert d["exact_duplicates"] == 7 and d["near_duplicates"] == (6 if action == "drop" else 9)
    assert all(local_report["counts"][s] > 0 for s in OUTPUTS)
    assert local_report["pii"]["email"] > 0 and local_report["pii"]["phone"] > 0
    # tool calling comes through both engines: tools, calls (redacted inside their JSON
    # arguments), results with their ids, weights; broken calls and copies rejected
    kept = [ex for s in ("train", "val", "test") for ex in read_jsonl_bytes(shard_lines(ray_out, s))
            if ex["meta"]["source"].endswith("tools.jsonl")]
    assert len(kept) == 9 and all(ex["tools"][0]["function"]["name"] == "track_order" for ex in kept)
    calls = [m["tool_calls"][0]["function"]["arguments"] for ex in kept for m in ex["messages"] if m.get("tool_calls")]
    assert len(calls) == 9 and all(json.loads(a).get("email", "[EMAIL]") == "[EMAIL]" for a in calls)
    assert sum("parallel_tool_calls" in ex for ex in kept) == 8
    assert all(m.get("tool_call_id") for ex in kept for m in ex["messages"] if m["role"] == "tool")
    rejects = [json.loads(line) for line in shard_lines(ray_out, "rejects").decode().splitlines()]
    tool_rejects = sorted(r["reason"].split(":")[0].split(" of ")[0] for r in rejects
                          if r["source"].endswith("tools.jsonl"))
    assert tool_rejects == ["duplicate", "invalid_tool_arguments"]
    dup = next(r for r in rejects if r["source"].endswith("tools.jsonl") and r["reason"].startswith("duplicate"))
    assert dup["record"]["tools"] == kept[0]["tools"]  # a reject keeps the whole record


@pytest.mark.parametrize("action", ["drop", "group"])
def test_ray_result_does_not_depend_on_the_number_of_workers(runs, action) -> None:
    (one, r1), (two, r2) = runs[action, 1], runs[action, 2]
    assert r1["engine"]["parallelism"] == 1 and r2["engine"]["parallelism"] == 2
    for name in OUTPUTS:
        # the same shards, byte for byte: the layout follows the inputs, not the blocks
        assert (one / name / "manifest.json").read_text() == (two / name / "manifest.json").read_text()
    assert len(json.loads((two / "train" / "manifest.json").read_text())["shards"]) > 1
    same_report(r1, r2)


def test_no_near_duplicate_cluster_crosses_splits(runs, corpus) -> None:
    from data_prep.steps.dedup import Deduplicator, similarity

    d = Deduplicator()
    for action in ("drop", "group"):
        out, report = runs[action, 2]
        assert report["leakage"]["near_dup_pairs_test_train"] == 0
        # independently of the pipeline's own check: every pair of kept near-duplicate answers
        # (estimated afresh) shares a split
        kept = [
            (s, ex["messages"][-1]["content"])
            for s in ("train", "val", "test")
            for ex in read_jsonl_bytes(shard_lines(out, s))
            if "/near/" in ex["meta"]["source"]
        ]
        sigs = [(s, d.signature(text)) for s, text in kept]
        similar = [(sa, sb) for i, (sa, a) in enumerate(sigs) for sb, b in sigs[i + 1 :] if similarity(a, b) >= 0.8]
        assert all(sa == sb for sa, sb in similar)
        # under drop nothing near-similar is kept; under group the triples are kept, together
        # (which split they share depends on the group names, i.e. on the temporary paths)
        assert (len(similar) == 0) if action == "drop" else (len(similar) >= 9 and len(kept) >= 18)


def read_jsonl_bytes(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode().splitlines()]


def test_file_urls_cli_and_overwrite_without_stale_shards(ray_session, corpus, tmp_path) -> None:
    urls = [p.as_uri() for p in corpus]
    local = tmp_path / "local"
    local_report = build(urls, local, **ARGS)  # the local engine reads the same URLs through fsspec
    out = (tmp_path / "ray").as_uri()
    argv = ["build", *urls, "--output-dir", out, "--engine", "ray", "--seed", "3"]
    argv += ["--test-fraction", "0.2", "--val-fraction", "0.1"]
    assert main(argv) == 0
    ray_dir = tmp_path / "ray"
    for name in OUTPUTS:
        assert shard_lines(ray_dir, name) == (local / f"{name}.jsonl").read_bytes()
    assert local_report["inputs"]["records_by_source"] == json.loads((ray_dir / "report.json").read_text())[
        "inputs"
    ]["records_by_source"]
    assert main(argv) == 2  # a non-empty output dir needs --overwrite
    # a build with smaller shards, then an overwrite with larger ones: no stale part file is left
    many = build(urls, out, overwrite=True, engine="ray", ray={"shard_records": 10}, **ARGS)
    assert many["counts"] == local_report["counts"]
    assert len(list((ray_dir / "train").glob("part-*.jsonl"))) > 3
    (ray_dir / "notes.txt").write_text("mine")
    assert main([*argv, "--overwrite"]) == 0
    assert len(list((ray_dir / "train").glob("part-*.jsonl"))) == 1
    assert (ray_dir / "notes.txt").read_text() == "mine"
    assert shard_lines(ray_dir, "train") == (local / "train.jsonl").read_bytes()


def test_nothing_kept_or_nothing_found(ray_session, tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Q", "answer": 3}\n{broken\n')
    empty = tmp_path / "empty"
    empty.mkdir()
    for name, sources, rejects in (("rejects-only", [bad], 2), ("no-files", [empty], 0)):
        local = build(sources, tmp_path / f"{name}-local")
        rep = build(sources, tmp_path / f"{name}-ray", engine="ray")
        same_report(local, rep)
        assert rep["counts"] == {"train": 0, "val": 0, "test": 0, "rejects": rejects}
        assert rep["accounting"]["balanced"]
        for out in OUTPUTS:
            local_file = tmp_path / f"{name}-local" / f"{out}.jsonl"
            assert shard_lines(tmp_path / f"{name}-ray", out) == local_file.read_bytes()


def test_recipe_key_is_validated_like_the_others(tmp_path, corpus) -> None:
    from data_prep.recipe import validate_recipe

    base = {"sources": [{"path": str(corpus[0])}], "output_dir": str(tmp_path / "o")}
    assert validate_recipe({**base, "engine": "ray"}).ray.parallelism is None
    with pytest.raises(RecipeError) as err:
        validate_recipe({**base, "engine": "spark", "ray": {"adress": "auto", "shard_records": 0}})
    keys = [p.split(":")[0] for p in err.value.problems]
    assert keys == ["engine", "ray.shard_records", "ray.adress"]
    with pytest.raises(RecipeError, match="memory:// is not shared with Ray"):
        validate_recipe({**base, "engine": "ray", "output_dir": "memory://out"})
    with pytest.raises(RecipeError, match="use engine: ray for a URL"):
        validate_recipe({**base, "output_dir": "s3://bucket/out"})


def test_missing_ray_says_what_to_install(monkeypatch, corpus, tmp_path, capsys) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    argv = ["build", str(corpus[0]), "--output-dir", str(tmp_path / "o"), "--engine", "ray"]
    assert main(argv) == 2
    assert "pip install 'finetune-kit[ray]'" in capsys.readouterr().err


@pytest.mark.slow
def test_finetune_prepare_and_train_read_the_shard_directory(runs, tiny_model, tmp_path) -> None:
    from finetune.config import load_config
    from finetune.data.cache import prepared_split
    from finetune.data.prepare import prepare
    from finetune.models.loading import load_tokenizer
    from finetune.training.recipe import train

    out, report = runs["drop", 2]
    local, _ = runs["drop", "local"]
    over = [f"model={tiny_model}", f"data.train={out / 'train'}", f"data.eval={out / 'val'}",
            f"output_dir={tmp_path / 'run'}", "training.max_steps=3", "training.batch_size=4",
            "training.report_to=[none]", "max_length=128", "data.loss_on=all", "lora.r=4",
            f"data.cache_dir={tmp_path / 'cache'}"]
    cfg = load_config(None, over)
    stats = prepare(cfg)
    assert stats["train"]["examples"] == report["counts"]["train"] and stats["eval"]["examples"] == report["counts"]["val"]
    # the shards tokenize to exactly what the local engine's single train.jsonl gives
    tok = load_tokenizer(str(tiny_model))
    shards, _, _ = prepared_split(cfg, tok, str(out / "train"))
    single, _, _ = prepared_split(load_config(None, [*over[:1], f"data.train={local / 'train.jsonl'}", *over[2:]]),
                                  tok, str(local / "train.jsonl"))
    assert shards["input_ids"] == single["input_ids"] and shards["labels"] == single["labels"]
    run = train(cfg)
    assert (run / "adapter").is_dir()
    info = json.loads((run / "run.json").read_text())
    assert info["data_stats"]["train"]["examples"] == report["counts"]["train"]
    # run.json names the shards by the hash of their concatenation: the local engine's train.jsonl
    assert info["data"]["train"]["sha256"] == hashlib.sha256((local / "train.jsonl").read_bytes()).hexdigest()
    assert info["data"]["train"]["files"] == len(json.loads((out / "train" / "manifest.json").read_text())["shards"])


def test_waiting_for_nodes_that_never_join_fails_with_the_count(ray_session) -> None:
    from data_prep.ray_engine import _wait_for_nodes

    _wait_for_nodes(ray_session, 1, timeout_s=5)  # this session's one node: no wait
    with pytest.raises(RuntimeError, match="has 1 of the 2 nodes of ray.wait_for_nodes after 1 s"):
        _wait_for_nodes(ray_session, 2, timeout_s=1)
