"""The tokenized data cache: the same tokens as today's encoder, built once, rebuilt whenever an
input changes, never read when broken."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from finetune.config import load_config
from finetune.data.cache import encode_conversations, prepared_split
from finetune.data.files import DataError
from tests.conftest import make_chat_examples, write_jsonl


def _cfg(tiny_model, train, tmp_path, *over):
    return load_config(None, [f"model={tiny_model}", f"data.train={train}", f"output_dir={tmp_path / 'run'}",
                              "training.report_to=[none]", "max_length=128", *over])


def _tok(tiny_model, template=None):
    from finetune.models.loading import load_tokenizer

    return load_tokenizer(str(tiny_model), chat_template=template)


def _rows(ds):
    return [(list(r["input_ids"]), list(r["labels"]), r["length"]) for r in ds]


MULTILINGUAL = [
    {"messages": [{"role": "user", "content": "¿Cuánto cuesta la lámpara?"}, {"role": "assistant", "content": "12 €"}]},
    {"messages": [{"role": "system", "content": "Réponds."}, {"role": "user", "content": "価格は？"},
                  {"role": "assistant", "content": "１２円です 😀"}, {"role": "user", "content": "再说一遍"},
                  {"role": "assistant", "content": "十二元"}]},
]


_TOOL = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}}}}}
_CALL = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
# Tool calls (a call-only turn, a call after text, a result) and a weight-0 turn.
TOOL_AND_WEIGHTS = [
    {"tools": [_TOOL], "messages": [{"role": "user", "content": "Weather in Oslo?"},
                                    {"role": "assistant", "content": None, "tool_calls": [_CALL]},
                                    {"role": "tool", "tool_call_id": "c1", "content": "sunny ☀"},
                                    {"role": "assistant", "content": "Sunny."}]},
    {"tools": [_TOOL], "messages": [{"role": "user", "content": "Oslo?"},
                                    {"role": "assistant", "content": "Checking…", "tool_calls": [_CALL]}]},
    {"messages": [{"role": "user", "content": "Price?"}, {"role": "assistant", "content": "No idea.", "weight": 0},
                  {"role": "user", "content": "Again?"}, {"role": "assistant", "content": "$9.", "weight": 1}]},
]


@pytest.mark.parametrize("loss_on", ["assistant", "last_assistant", "all"])
@pytest.mark.parametrize("max_length", [24, 128, 1024])
def test_batch_encoder_equals_encode_chat(tiny_model, chat_data, tmp_path, loss_on, max_length):
    from finetune.data.chat_template import encode_chat
    from finetune.data.files import read_chat_jsonl

    tok = _tok(tiny_model)
    # Through the training reader, so the records are in the form the data cache encodes.
    extra = read_chat_jsonl(write_jsonl(tmp_path / "extra.jsonl", MULTILINGUAL + TOOL_AND_WEIGHTS))
    records = read_chat_jsonl(chat_data["train"]) + extra
    convs = [r["messages"] for r in records]
    tools = [r.get("tools") for r in records]
    got = encode_conversations(tok, convs, max_length=max_length, loss_on=loss_on, tools=tools)
    for msgs, t, g in zip(convs, tools, got):
        ref = encode_chat(tok, msgs, max_length=max_length, loss_on=loss_on, tools=t)
        assert g["input_ids"].tolist() == ref.input_ids and g["labels"].tolist() == ref.labels
        assert (g["n_trained"], g["trained_bytes"], g["truncated"]) == (ref.n_trained, ref.trained_bytes, ref.truncated)



def tokenize_dataset(  # the reference the cache must equal: one example at a time, in Python
    tokenizer,
    path,
    *,
    max_length: int,
    loss_on: str = "assistant",
    too_long: str = "truncate",
):
    """Encode every example with encode_chat; refuse when examples end up with no trained token."""
    from finetune.data.chat_template import ChatFormatError, encode_chat
    from finetune.data.files import DataStats, read_chat_jsonl, untrained_error

    records = read_chat_jsonl(path)
    stats = DataStats(examples=len(records))
    rows = []
    untrained: list[str] = []
    for rec in records:
        where = f"{rec.get('file', path)}:{rec['line']}"
        try:
            enc = encode_chat(tokenizer, rec["messages"], max_length=None, loss_on=loss_on, tools=rec.get("tools"))
        except ChatFormatError as exc:
            raise DataError(f"{where}: {exc}") from None
        if len(enc.input_ids) > max_length:
            if too_long == "drop":
                stats.dropped["longer_than_max_length"] += 1
                continue
            enc = encode_chat(tokenizer, rec["messages"], max_length=max_length, loss_on=loss_on,
                              tools=rec.get("tools"))
            stats.truncated += 1
        if enc.n_trained == 0:
            untrained.append(where)
            continue
        rows.append({"input_ids": enc.input_ids, "labels": enc.labels})
        stats.kept += 1
        stats.tokens += len(enc.input_ids)
        stats.trained_tokens += enc.n_trained
        stats.max_tokens = max(stats.max_tokens, len(enc.input_ids))
    if untrained:
        raise untrained_error(untrained, max_length)
    if not rows:
        raise DataError(f"no example of {path} is left to train on: {dict(stats.dropped)}")
    return rows, stats


@pytest.mark.parametrize("too_long,loss_on,max_length", [("truncate", "all", 48), ("drop", "assistant", 80)])
def test_cache_equals_todays_encoder_with_its_counts(tiny_model, tmp_path, too_long, loss_on, max_length):
    data = write_jsonl(tmp_path / "d" / "train.jsonl", make_chat_examples(300, seed=3) + MULTILINGUAL + TOOL_AND_WEIGHTS)
    cfg = _cfg(tiny_model, data, tmp_path, f"max_length={max_length}", f"data.too_long={too_long}",
               f"data.loss_on={loss_on}")
    tok = _tok(tiny_model)
    ds, stats, final = prepared_split(cfg, tok, str(data))
    rows, ref_stats = tokenize_dataset(tok, data, max_length=max_length, too_long=too_long, loss_on=loss_on)
    assert [(r[0], r[1]) for r in _rows(ds)] == [(r["input_ids"], r["labels"]) for r in rows]
    assert [r[2] for r in _rows(ds)] == [len(r["input_ids"]) for r in rows]
    assert stats.as_dict() == ref_stats.as_dict()
    assert stats.truncated + sum(stats.dropped.values()) > 0  # the case is really exercised
    assert final.parent == data.parent / ".finetune-cache"


def test_a_parallel_build_equals_a_serial_one(tiny_model, tmp_path, monkeypatch):
    import finetune.data.cache as dc

    data = write_jsonl(tmp_path / "d" / "train.jsonl", make_chat_examples(400, seed=4))
    tok = _tok(tiny_model)
    serial, s1, _ = prepared_split(_cfg(tiny_model, data, tmp_path, f"data.cache_dir={tmp_path / 'c1'}"), tok, str(data))
    monkeypatch.setattr(dc, "PARALLEL_MIN_BYTES", 0)
    par, s2, final = prepared_split(_cfg(tiny_model, data, tmp_path, f"data.cache_dir={tmp_path / 'c2'}",
                                         "data.num_proc=2"), tok, str(data))
    meta = json.loads((final / "meta.json").read_text())
    assert meta["num_proc"] == 2 and len(meta["shards"]) == 8
    assert _rows(par) == _rows(serial) and s1.as_dict() == s2.as_dict()
    assert [r["line"] for r in par] == list(range(1, 401))


def test_errors_name_file_and_line_as_before(tiny_model, tmp_path, monkeypatch):
    import finetune.data.cache as dc

    good = [json.dumps(r) for r in make_chat_examples(30, seed=5)]
    lines = good[:10] + ["{not json"] + good[10:20] + [json.dumps({"messages": [{"role": "function",
                                                                                "content": "x"}]})] + good[20:]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    for num_proc in (1, 2):
        monkeypatch.setattr(dc, "PARALLEL_MIN_BYTES", 0 if num_proc == 2 else 1 << 40)
        cfg = _cfg(tiny_model, bad, tmp_path, f"data.num_proc={num_proc}", f"data.cache_dir={tmp_path / str(num_proc)}")
        with pytest.raises(DataError, match=r"(?s)2 bad line\(s\) in .*bad\.jsonl:11: malformed JSON.*bad\.jsonl:22: "
                                            r"message 0.*'function'") as err:
            prepared_split(cfg, _tok(tiny_model), str(bad))
        assert "data-prep validate" in str(err.value)
        assert not any((tmp_path / str(num_proc)).glob("bad-*/COMPLETE"))  # nothing cached


def test_any_changed_input_rebuilds_and_an_unchanged_one_reuses(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "d" / "train.jsonl", make_chat_examples(50, seed=6))
    tok = _tok(tiny_model)
    cfg = _cfg(tiny_model, data, tmp_path)
    _, _, first = prepared_split(cfg, tok, str(data))
    log = first.parent / "builds.log"
    _, _, again = prepared_split(cfg, tok, str(data))
    assert again == first and len(log.read_text().splitlines()) == 1  # warm: no second build

    seen = {first}
    changed_tok = _tok(tiny_model)
    changed_tok.add_tokens(["<new_token>"])
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    for label, (c, t) in {
        "max_length": (_cfg(tiny_model, data, tmp_path, "max_length=100"), tok),
        "loss_on": (_cfg(tiny_model, data, tmp_path, "data.loss_on=all"), tok),
        "tokenizer": (cfg, changed_tok),
        "template": (cfg, _tok(tiny_model, template)),
    }.items():
        _, _, d = prepared_split(c, t, str(data))
        assert d not in seen, label
        seen.add(d)
    with data.open("a") as fh:  # the data file itself
        fh.write(json.dumps(make_chat_examples(1, seed=9)[0]) + "\n")
    ds, stats, d = prepared_split(cfg, tok, str(data))
    assert d not in seen and stats.examples == 51 and len(ds) == 51
    assert len(log.read_text().splitlines()) == 6


def test_a_broken_or_half_written_cache_is_rebuilt_never_read(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "d" / "train.jsonl", make_chat_examples(60, seed=7))
    tok = _tok(tiny_model)
    cfg = _cfg(tiny_model, data, tmp_path)
    ds, _, final = prepared_split(cfg, tok, str(data))
    good = _rows(ds)
    del ds
    log = final.parent / "builds.log"
    shard = next(final.glob("shard-*.arrow"))
    # 1. a truncated shard (a copy cut short, a full disk)
    with shard.open("r+b") as fh:
        fh.truncate(shard.stat().st_size // 2)
    ds, _, _ = prepared_split(cfg, tok, str(data))
    assert _rows(ds) == good and len(log.read_text().splitlines()) == 2
    # 2. a build killed before COMPLETE: the final directory is there, the marker is not
    (final / "COMPLETE").unlink()
    ds, _, _ = prepared_split(cfg, tok, str(data))
    assert _rows(ds) == good and len(log.read_text().splitlines()) == 3
    # 3. a killed build's temporary directory (dead pid on this host) is cleaned up
    import socket

    dead = final.parent / f".build-{final.name}-{socket.gethostname()}-999999999"
    dead.mkdir()
    shutil.rmtree(final)
    ds, _, _ = prepared_split(cfg, tok, str(data))
    assert _rows(ds) == good and not dead.exists()


def test_other_ranks_wait_for_the_builder_and_share_its_failure(tiny_model, tmp_path, monkeypatch):
    """A rank that does not build polls for COMPLETE (no collective); when the builder failed, it
    stops with the builder's error at once instead of waiting out its timeout."""
    import threading
    import time

    from kitcore.runtime import Runtime

    data = write_jsonl(tmp_path / "d" / "train.jsonl", make_chat_examples(40, seed=8))
    tok = _tok(tiny_model)
    cfg = _cfg(tiny_model, data, tmp_path, "data.cache_wait_s=60")
    waiter = Runtime(1, 1, 2, 2, "cpu", "gloo")
    builder = Runtime(0, 0, 2, 2, "cpu", "gloo")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")
    got = {}
    t = threading.Thread(target=lambda: got.update(r=prepared_split(cfg, tok, str(data), waiter)))
    t.start()
    time.sleep(1.5)
    assert t.is_alive()  # waiting: nothing built yet
    ds, _, _ = prepared_split(cfg, tok, str(data), builder)
    t.join(30)
    assert not t.is_alive() and _rows(got["r"][0]) == _rows(ds)

    bad = tmp_path / "d" / "bad.jsonl"
    bad.write_text("{oops\n")
    with pytest.raises(DataError):
        prepared_split(cfg, tok, str(bad), builder)
    t0 = time.monotonic()
    with pytest.raises(DataError, match="bad.jsonl:1: malformed JSON"):
        prepared_split(cfg, tok, str(bad), waiter)
    assert time.monotonic() - t0 < 10
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-2")  # a later job does not trust that marker
    cfg2 = _cfg(tiny_model, data, tmp_path, "data.cache_wait_s=2")
    with pytest.raises(RuntimeError, match="waited 2 s for the data cache"):
        prepared_split(cfg2, tok, str(bad), waiter)


def _write_shards(root: Path, examples: list[dict], per_shard: int) -> Path:
    """A shard directory as `data-prep --engine ray` writes it (its own writer functions)."""
    from data_prep.writers import shard_name, write_manifest, write_shard

    entries = [write_shard(str(root / shard_name(i)), [json.dumps(e) for e in examples[a:a + per_shard]])
               for i, a in enumerate(range(0, len(examples), per_shard))]
    write_manifest(str(root), root.name, entries)
    return root


def test_a_shard_directory_tokenizes_as_its_single_file_does(tiny_model, tmp_path, monkeypatch):
    import finetune.data.cache as dc

    examples = make_chat_examples(230, seed=12) + MULTILINGUAL
    single = write_jsonl(tmp_path / "single" / "train.jsonl", examples)
    shards = _write_shards(tmp_path / "out" / "train", examples, per_shard=50)
    tok = _tok(tiny_model)
    ref, ref_stats, ref_dir = prepared_split(_cfg(tiny_model, single, tmp_path), tok, str(single))
    # the single-file case, as before: keyed by the file's own hash and size, cached beside it
    assert ref_dir.parent == single.parent / ".finetune-cache"
    assert set(json.loads((ref_dir / "meta.json").read_text())["inputs"]["data"]) == {"sha256", "size"}
    # the directory (through its manifest), the manifest itself and a glob of the shards
    for spec in (shards, shards / "manifest.json", f"{shards}/part-*.jsonl"):
        cfg = _cfg(tiny_model, spec, tmp_path)
        ds, stats, final = prepared_split(cfg, tok, str(spec))
        assert _rows(ds) == _rows(ref) and stats.as_dict() == ref_stats.as_dict(), spec
        assert final.parent == tmp_path / "out" / ".finetune-cache" and final.name.startswith("train-")
    meta = json.loads((final / "meta.json").read_text())
    assert [Path(m["source"]).name for m in meta["shards"]] == [f"part-{i:05d}.jsonl" for i in range(5)]
    # a parallel build over several shards: the same rows, lines numbered within each shard
    monkeypatch.setattr(dc, "PARALLEL_MIN_BYTES", 0)
    cfg = _cfg(tiny_model, shards, tmp_path, f"data.cache_dir={tmp_path / 'par'}", "data.num_proc=2")
    par, _, _ = prepared_split(cfg, tok, str(shards))
    assert _rows(par) == _rows(ref)
    assert [r["line"] for r in par][:52] == list(range(1, 51)) + [1, 2]
    # one more shard in the manifest is a new dataset: a new key
    _write_shards(tmp_path / "out" / "train", examples + examples[:10], per_shard=50)
    ds, stats, again = prepared_split(_cfg(tiny_model, shards, tmp_path), tok, str(shards))
    assert again != final and stats.examples == len(examples) + 10


def test_shard_errors_name_the_shard_and_its_line(tiny_model, tmp_path):
    from finetune.config import ConfigError

    examples = make_chat_examples(60, seed=13)
    shards = _write_shards(tmp_path / "out" / "train", examples, per_shard=20)
    lines = (shards / "part-00001.jsonl").read_text().splitlines()
    lines[6] = "{not json"
    (shards / "part-00001.jsonl").write_text("\n".join(lines) + "\n")
    tok = _tok(tiny_model)
    with pytest.raises(DataError, match="SHA-256 differs from the one in .*manifest.json"):
        prepared_split(_cfg(tiny_model, shards, tmp_path), tok, str(shards))
    glob_spec = f"{shards}/part-*.jsonl"  # no manifest to check against: the line itself is named
    with pytest.raises(DataError, match=r"(?s)1 bad line\(s\) in .*part-\*\.jsonl.*part-00001\.jsonl:7: malformed JSON"):
        prepared_split(_cfg(tiny_model, glob_spec, tmp_path), tok, glob_spec)
    (shards / "manifest.json").unlink()  # an interrupted build: refused, with the way out
    with pytest.raises(ConfigError, match=r"data\.train: .*without manifest\.json.*give a glob: .*/\*\.jsonl"):
        _cfg(tiny_model, shards, tmp_path)


def test_sampler_order_is_unchanged_by_the_array_implementation():
    """The numpy sampler gives exactly the batches of the list-based one it replaced (so resumed
    runs and earlier results replay), here written out as the reference. (A run whose micro-batch
    `auto` decided moves its heaviest batches early: test_plan_data checks that order.)"""
    import torch

    from finetune.data.sampler import LengthGroupedShuffledSampler

    def reference(lengths, bs, window, seed, epoch):
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(len(lengths), generator=g).tolist()
        span, full, partial = window * bs, [], []
        for start in range(0, len(order), span):
            chunk = sorted(order[start:start + span], key=lengths.__getitem__)
            for b in range(0, len(chunk), bs):
                batch = chunk[b:b + bs]
                if len(batch) == bs:
                    full.append(batch)
                else:
                    partial = batch
        perm = torch.randperm(len(full), generator=g).tolist()
        return [full[i] for i in perm] + ([partial] if partial else [])

    rng = np.random.default_rng(0)
    for n, bs, window in ((1000, 8, 4), (997, 4, 64), (5, 8, 2)):
        lengths = rng.integers(5, 40, size=n).tolist()
        s = LengthGroupedShuffledSampler(np.asarray(lengths), bs, window=window, seed=3)
        s.set_epoch(2)
        assert s.batches() == reference(lengths, bs, window, 3, 2)


def test_finetune_prepare_builds_ahead_and_train_starts_warm(tiny_model, tmp_path):
    import subprocess
    import sys

    data = write_jsonl(tmp_path / "d" / "train.jsonl", make_chat_examples(80, seed=10))
    ev = write_jsonl(tmp_path / "d" / "eval.jsonl", make_chat_examples(20, seed=11))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    import yaml

    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"model": str(tiny_model), "data": {"train": str(data), "eval": str(ev)},
                                      "output_dir": str(tmp_path / "run"), "max_length": 128}))
    common = [str(config), "training.max_steps=2", "training.report_to=[none]"]
    res = subprocess.run([sys.executable, "-m", "finetune", "prepare", *common], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "train: 80 examples" in res.stdout and "eval: 20 examples" in res.stdout, res.stdout
    log = data.parent / ".finetune-cache" / "builds.log"
    assert len(log.read_text().splitlines()) == 2
    res = subprocess.run([sys.executable, "-m", "finetune", "train", *common], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(log.read_text().splitlines()) == 2  # train tokenized nothing
    assert Path(tmp_path / "run" / "adapter").is_dir()


@pytest.mark.slow
def test_a_resumed_run_skips_consumed_batches_by_index_and_sees_the_same_batches(tiny_model, tmp_path):
    """A run of a 20,000-example epoch resumed at step 250: accelerate's SkipBatchSampler skips the
    consumed batches by index over our sampler (no example is read to get there), the first step
    comes at once, and steps 251-260 see the batches the uninterrupted run saw: the same losses.
    (How the skip scales to 200k examples and late steps: scripts/bench_data_path.py.)"""
    import time

    from transformers import TrainerCallback

    from finetune.training.recipe import train

    data = write_jsonl(tmp_path / "d" / "train.jsonl", make_chat_examples(20_000, seed=12))

    class Clock(TrainerCallback):
        first_step_s = None

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if self.first_step_s is None:
                self.first_step_s = time.perf_counter() - self.t0

    over = ["training.max_steps=260", "training.save_steps=250", "training.batch_size=4", "training.logging_steps=1",
            "training.learning_rate=1e-3", "lora.dropout=0", "lora.r=4", "training.save_total_limit=3"]
    run = train(_cfg(tiny_model, data, tmp_path, *over))
    losses = {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if "loss" in r}
    (run / "checkpoints" / "checkpoint-260" / "COMPLETE").unlink()  # as if killed after step 250's save
    clock = Clock()
    t0 = time.perf_counter()
    train(_cfg(tiny_model, data, tmp_path, *over, "resume=true"), callbacks=[clock])
    resumed = {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
               if "loss" in r}
    print(f"resumed at step 250: first step {clock.first_step_s:.2f} s after the trainer started, "
          f"whole resumed run {time.perf_counter() - t0:.1f} s")
    assert clock.first_step_s < 5, clock.first_step_s
    for step in range(251, 261):
        assert resumed[step] == pytest.approx(losses[step], rel=1e-4), step


def test_the_job_id_differs_between_launches_even_when_torchrun_names_every_run_none(monkeypatch):
    """`accelerate launch` leaves torchrun's run id at its default "none" for every launch: a marker
    keyed by it would make a later launch trust an earlier one's failure or verification."""
    from finetune.data.cache import _job_id

    for k in ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert _job_id() == f"10.0.0.1:29500:{os.getppid()}"  # the launcher's pid: one per launch
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert _job_id() == "slurm:42:0:1"  # the same on every node of the step; a requeue is another launch
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run-7")
    assert _job_id() == "run-7"
