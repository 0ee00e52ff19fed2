"""The plan from the data: the longest micro-batch it plans for is the one the run's own sampler and
collator produce; every run logs its measured peak beside the plan's figure."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from finetune.plan.batches import longest_batch

REPO = Path(__file__).resolve().parents[2]


def _trainer_batches(tiny_model, chat_data, tmp_path, *over: str, heavy_early: bool = False):
    """The micro-batches the real Trainer's DataLoader yields for one epoch, and the run's config and lengths."""
    from transformers import AutoModelForCausalLM

    from finetune.config import load_config
    from finetune.models.loading import load_tokenizer
    from finetune.training.arguments import training_arguments
    from finetune.training.launch import resolve_launch
    from finetune.training.recipe import _setup_data, _setup_trainer
    from kitcore.runtime import current

    cfg = load_config(None, [f"model={tiny_model}", f"data.train={chat_data['train']}",
                             f"output_dir={tmp_path / 'run'}", "training.batch_size=4", "training.report_to=[none]",
                             "max_length=256", *over])
    tok = load_tokenizer(cfg.model)
    train_ds, _, _ = _setup_data(cfg, tok)
    args = training_arguments(cfg, Path(cfg.output_dir), False, resolve_launch(cfg, current()))
    model = AutoModelForCausalLM.from_pretrained(cfg.model)
    trainer = _setup_trainer(cfg, args, Path(cfg.output_dir), model, tok, train_ds, None, heavy_early=heavy_early)
    batches = list(trainer.get_train_dataloader())
    return cfg, train_ds.data.column("length").to_numpy(), batches


@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("packing", [False, True])
def test_the_simulated_longest_batch_is_the_trainers_longest_batch(tiny_model, chat_data, tmp_path, grouped, packing):
    cfg, lengths, batches = _trainer_batches(tiny_model, chat_data, tmp_path, f"training.group_by_length={grouped}",
                                             f"packing={packing}")
    assert len(set(lengths.tolist())) > 5, "the data must vary in length for this test to mean anything"
    real = max(b["input_ids"].numel() for b in batches)  # rows x padded length; packed: the one row
    sim = longest_batch(lengths, cfg.training.batch_size, group_by_length=grouped, window=cfg.training.group_window,
                        seed=cfg.seed, packing=packing)
    if grouped:  # replayed: the very batch, and where it is
        assert sim.exact and sim.tokens == real
        i = sim.index
        assert batches[i]["input_ids"].numel() == real and batches[i]["input_ids"].shape[-1] == sim.row_tokens
    elif not packing:  # the longest example's batch pads every row to it (96 examples: no partial batch)
        assert sim.exact and sim.tokens == real == 4 * int(lengths.max())
    else:  # random order, packed: an upper bound that holds
        assert not sim.exact and sim.tokens >= real


def test_the_longest_batchs_trained_tokens_are_the_ones_the_loss_scores(tiny_model, chat_data, tmp_path):
    """The chunked loss runs at trained positions only; the plan counts the longest batch's from the cache."""
    from finetune.plan.batches import with_trained_tokens
    from finetune.plan.command import trained_counter

    cfg, lengths, batches = _trainer_batches(tiny_model, chat_data, tmp_path)
    from finetune.config import load_config  # noqa: F401  (the same config as the trainer's)
    from finetune.data.cache import prepared_split
    from finetune.models.loading import load_tokenizer

    ds, stats, _ = prepared_split(cfg, load_tokenizer(cfg.model), cfg.data.train)
    count = trained_counter(ds)
    assert count(list(range(len(ds)))) == stats.trained_tokens
    sim = longest_batch(lengths, 4, window=cfg.training.group_window, seed=cfg.seed)
    sim = with_trained_tokens(sim, count, stats.trained_tokens / stats.kept)
    real = batches[sim.index]["labels"]
    assert sim.trained_tokens == int((real[:, 1:] != -100).sum()) < sim.tokens


def test_the_heaviest_batches_are_the_second_step_so_a_short_run_plans_for_them():
    """Each epoch makes its heaviest micro-batches the second optimizer step (grad_accum x ranks of them,
    the first step that holds the optimizer's states too): memory runs out in the first two steps, not
    late in an epoch, and a run of a few steps is planned for them; the plan's simulation replays the
    sampler, early stop included. The order depends on grad_accum x ranks only."""
    from finetune.data.sampler import LengthGroupedShuffledSampler, heavy_batches_at

    assert heavy_batches_at([1, 5, 2, 5, 3], 2, 2) == [0, 2, 1, 3, 4]  # the two 5s, in order, at 2
    assert heavy_batches_at([1, 5, 2], 1, 9) == [0, 2, 1]  # clamped to fit
    assert heavy_batches_at([4, 1], 1, 0) == [0, 1] and heavy_batches_at([], 1, 3) == []
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 400, size=1000)
    lengths[500] = 2000  # one long outlier
    everything = longest_batch(lengths, 8, seed=3, step_batches=3)
    first = longest_batch(lengths, 8, seed=3, micro_batches=6, step_batches=3)
    full, _ = LengthGroupedShuffledSampler(lengths, 8, seed=3, step_batches=3).epoch_arrays()
    assert any(500 in b for b in full[3:6]) and everything.tokens == 8 * 2000 == first.tokens and 3 <= first.index < 6
    assert longest_batch(lengths, 8, seed=3, micro_batches=3, step_batches=3).tokens < everything.tokens
    heaviest = sorted((int(lengths[b].max()) for b in full), reverse=True)[:3]
    assert sorted((int(lengths[b].max()) for b in full[3:6]), reverse=True) == heaviest
    # 4 ranks x grad_accum 2 = 1 rank x grad_accum 8: the same order (a run resumed on fewer ranks replays it)
    eight, _ = LengthGroupedShuffledSampler(lengths, 8, seed=3, step_batches=8).epoch_arrays()
    heaviest = sorted((int(lengths[b].max()) for b in eight), reverse=True)[:8]
    assert sorted((int(lengths[b].max()) for b in eight[8:16]), reverse=True) == heaviest
    assert sorted(map(tuple, eight.tolist())) == sorted(map(tuple, full.tolist()))  # the same batches
    # several epochs: the longest of all of them, each replayed with its own order
    two = longest_batch(lengths, 8, seed=3, epochs=2)
    s = LengthGroupedShuffledSampler(lengths, 8, seed=3)
    per_epoch = []
    for e in range(2):
        s.set_epoch(e)
        f, p = s.epoch_arrays()
        per_epoch.append(max([8 * int(lengths[b].max()) for b in f] + ([len(p) * int(lengths[p].max())] if p is not None else [])))
    assert two.tokens == max(per_epoch) and two.epoch == int(np.argmax(per_epoch))


def test_the_plan_from_data_is_the_worst_case_for_max_length_rows_and_smaller_for_short_data(tiny_model, tmp_path):
    from finetune.config import load_config
    from finetune.plan.batches import LongestBatch
    from finetune.plan.memory import (
        ModelShape,
        make_plan,
        plan_from_batch,
        resolve_model_config,
        setup_from_config,
    )

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "ok"}]}) + "\n")
    cfg = load_config(None, [f"model={tiny_model}", f"data.train={data}", f"output_dir={tmp_path / 'r'}",
                             "max_length=512", "training.batch_size=8"])
    raw, src = resolve_model_config(cfg.model)
    shape = ModelShape.from_config(raw, src)
    s = setup_from_config(cfg, device="cpu")
    worst = make_plan(shape, s, alternatives=False)
    full_rows = plan_from_batch(shape, s, LongestBatch(8, 512, 8, 512, 0, 0, True, False, 100), alternatives=False)
    short = plan_from_batch(shape, s, LongestBatch(8, 128, 8, 128, 0, 0, True, False, 100), alternatives=False)
    assert full_rows.device_total == pytest.approx(worst.device_total)
    assert short.device_total < worst.device_total and short.worst_case_total == pytest.approx(worst.device_total)
    assert "8 x 128 tokens" in short.setup.batch_note


def test_finetune_plan_data_prints_the_longest_batch_and_the_worst_case(tiny_model, chat_data, tmp_path):
    cfg = tmp_path / "t.yaml"
    cfg.write_text(f"model: {tiny_model}\ndata:\n  train: {chat_data['train']}\n  cache_dir: {tmp_path / 'cache'}\n"
                   f"output_dir: {tmp_path / 'run'}\nmax_length: 512\ntraining:\n  batch_size: 4\n")
    proc = subprocess.run([sys.executable, "-m", "finetune", "plan", str(cfg), "--data", "--device", "cpu",
                           "--json"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert "longest example" in plan["longest_batch"]
    assert plan["device_total"] < plan["worst_case_device_total"]
    assert plan["setup"]["max_length"] == 512 and plan["setup"]["seq_len"] < 512
    text = subprocess.run([sys.executable, "-m", "finetune", "plan", str(cfg), "--device", "cpu"],
                          capture_output=True, text=True, cwd=REPO, timeout=300).stdout
    assert "every row 512 tokens (max_length)" in text and "--data" in text


@pytest.mark.slow
def test_every_run_logs_its_measured_peak_beside_the_plan(tiny_model, chat_data, tmp_path):
    from finetune.config import load_config
    from finetune.training.recipe import train

    run = train(load_config(None, [f"model={tiny_model}", f"data.train={chat_data['train']}",
                                   f"output_dir={tmp_path / 'run'}", "training.max_steps=4", "training.batch_size=4",
                                   "training.report_to=[none]", "max_length=128"]))
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "memory_plan_bytes" in x]
    assert len(recs) == 1 and recs[0]["step"] == 3
    assert recs[0]["memory_measured_bytes"] > 0 and recs[0]["memory_plan_bytes"] > 0
    mem = json.loads((run / "run.json").read_text())["memory"]
    assert mem["memory_plan_bytes"] == recs[0]["memory_plan_bytes"] and mem["device"] == "cpu"
    assert "tokens" in mem["batch"]


def test_the_memory_check_warns_only_past_the_tolerance(tmp_path, monkeypatch, caplog):
    import finetune.training.callbacks as cb

    gib = 2**30
    for measured, warned in ((10 * gib, False), (int(7.5 * gib), True), (int(9.0 * gib), False)):
        check = cb.MemoryCheck({"device": "cpu", "bytes": 10 * gib, "batch": "4 x 100 tokens"}, baseline=gib,
                               metrics=None, run_info=None)
        monkeypatch.setattr(cb, "process_rss", lambda key="VmRSS", m=measured: m + gib)
        caplog.clear()
        rec = check.measure(3, True)
        assert rec["memory_measured_bytes"] == measured
        assert rec["memory_plan_error"] == pytest.approx((10 * gib - measured) / measured, abs=1e-4)
        assert ("the plan said" in caplog.text) is warned


# ----------------------------------------------------------------------------------------------
# token-budget micro-batches (training.tokens_per_batch)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_token_budget_batches_hold_every_example_once_within_the_budget(packing, replicas):
    from finetune.data.sampler import TokenBudgetBatchSampler

    rng = np.random.default_rng(7)
    for trial in range(20):
        n = int(rng.integers(1, 400))
        lengths = rng.integers(1, 300, size=n)
        budget = int(rng.integers(300, 3000))
        step = replicas * int(rng.integers(1, 4))  # grad_accum x ranks
        s = TokenBudgetBatchSampler(lengths, budget, seed=trial, packing=packing, num_replicas=replicas,
                                    step_batches=step)
        counts = []
        for epoch in range(3):
            s.set_epoch(epoch)
            batches = [list(b) for b in s]
            counts.append(len(batches))
            flat = sorted(i for b in batches for i in b)
            assert flat == list(range(n)), "every example exactly once per epoch"
            sizes = [int(lengths[b].sum()) if packing else len(b) * int(lengths[b].max()) for b in batches]
            assert all(size <= budget or len(b) == 1 for size, b in zip(sizes, batches))
            # the heaviest are the second step (clamped so that they fit)
            k = min(step, len(sizes))
            at = min(step, len(sizes) - k)
            assert sorted(sizes[at:at + k], reverse=True) == sorted(sizes, reverse=True)[:k]
        assert len(set(counts)) == 1 == len(set([len(s)] + counts)), "the same number of batches every epoch"
        assert len(s) % replicas == 0 or len(s) < replicas
        again = TokenBudgetBatchSampler(lengths, budget, seed=trial, packing=packing, num_replicas=replicas,
                                        step_batches=step)
        again.set_epoch(2)
        assert [list(b) for b in again] == batches, "a function of the seed and the epoch"
        if len(s) >= 8:  # another epoch, another order (two orders of 8+ batches coincide 1 time in 40,320)
            s.set_epoch(0)
            assert [list(b) for b in s] != batches


def test_token_budget_batches_beat_fixed_batches_on_spread_lengths():
    """The point of a budget: full steps. Padded tokens per step vary far less than with batch_size rows."""
    from finetune.data.sampler import LengthGroupedShuffledSampler, TokenBudgetBatchSampler

    lengths = np.random.default_rng(0).lognormal(5.0, 0.9, size=2000).astype(int).clip(8, 2048)
    budget = TokenBudgetBatchSampler(lengths, 8 * 2048, seed=0)
    fixed = LengthGroupedShuffledSampler(lengths, 8, seed=0)
    t_budget = np.array([budget.batch_tokens(b) for b in budget.epoch_batches()])
    full, _ = fixed.epoch_arrays()
    t_fixed = np.array([8 * lengths[b].max() for b in full])
    assert t_budget.max() <= 8 * 2048
    assert t_budget.mean() > 2 * t_fixed.mean() and len(budget) < len(full) / 2


def test_the_trainer_runs_the_budget_batches_and_the_plan_finds_the_longest(tiny_model, chat_data, tmp_path):
    from finetune.plan.batches import longest_budget_batch

    cfg, lengths, batches = _trainer_batches(tiny_model, chat_data, tmp_path, "training.tokens_per_batch=600")
    assert all(b["input_ids"].numel() <= 600 for b in batches)
    assert sum(b["input_ids"].shape[0] for b in batches) == len(lengths)
    assert len({b["input_ids"].shape[0] for b in batches}) > 1, "rows vary with the examples' lengths"
    sim = longest_budget_batch(lengths, 600, seed=cfg.seed)
    assert sim.tokens == max(b["input_ids"].numel() for b in batches)
    assert batches[sim.index]["input_ids"].numel() == sim.tokens


@pytest.mark.parametrize("budget", [None, 600])
def test_an_auto_runs_trainer_makes_its_heaviest_batch_the_second_step_as_the_plan_simulates(tiny_model, chat_data,
                                                                                             tmp_path, budget):
    """heavy_early (a run whose micro-batch `auto` decided): the Trainer's second micro-batch (grad_accum 1,
    one rank) is the heaviest of the epoch, and the plan's simulation says so; without it, the order
    is the shuffled one."""
    from finetune.plan.batches import longest_budget_batch

    over = [f"training.tokens_per_batch={budget}"] if budget else []
    cfg, lengths, batches = _trainer_batches(tiny_model, chat_data, tmp_path, *over, heavy_early=True)
    sizes = [b["input_ids"].numel() for b in batches]
    assert sizes[1] == max(sizes), sizes[:4]
    sim = (longest_budget_batch(lengths, budget, seed=cfg.seed, step_batches=1) if budget else
           longest_batch(lengths, 4, window=cfg.training.group_window, seed=cfg.seed, step_batches=1))
    assert sim.index == 1 and sim.tokens == sizes[1]
    _, _, plain = _trainer_batches(tiny_model, chat_data, tmp_path / "plain", *over)
    assert [b["input_ids"].numel() for b in plain] != sizes  # a fixed micro-batch keeps the shuffled order


def test_a_resumed_epoch_continues_with_the_same_budget_batches(tiny_model, chat_data, tmp_path):
    from transformers import AutoModelForCausalLM

    from finetune.config import load_config
    from finetune.models.loading import load_tokenizer
    from finetune.training.arguments import training_arguments
    from finetune.training.launch import resolve_launch
    from finetune.training.recipe import _setup_data, _setup_trainer
    from kitcore.runtime import current

    cfg = load_config(None, [f"model={tiny_model}", f"data.train={chat_data['train']}", f"output_dir={tmp_path / 'r'}",
                             "training.tokens_per_batch=700", "training.report_to=[none]", "max_length=256"])
    tok = load_tokenizer(cfg.model)
    train_ds, _, _ = _setup_data(cfg, tok)
    args = training_arguments(cfg, Path(cfg.output_dir), False, resolve_launch(cfg, current()))
    trainer = _setup_trainer(cfg, args, Path(cfg.output_dir), AutoModelForCausalLM.from_pretrained(cfg.model), tok,
                             train_ds, None)
    dl = trainer.get_train_dataloader()
    dl.set_epoch(1)
    full = [b["input_ids"].tolist() for b in dl]
    dl.set_epoch(1)
    from accelerate import skip_first_batches  # what the Trainer resumes a mid-epoch run with (5.17 to 5.25)

    resumed = [b["input_ids"].tolist() for b in skip_first_batches(dl, 3)]
    assert resumed == full[3:]
    dl.set_epoch(0)
    assert [b["input_ids"].tolist() for b in dl] != full, "another epoch, another order"


def test_a_token_budget_smaller_than_max_length_or_on_pairs_is_refused(tiny_model, chat_data, tmp_path):
    from finetune.config import ConfigError, load_config

    base = [f"model={tiny_model}", f"data.train={chat_data['train']}", f"output_dir={tmp_path}"]
    with pytest.raises(ConfigError) as e:
        load_config(None, [*base, "max_length=512", "training.tokens_per_batch=256"])
    assert e.value.problems[0][0] == "training.tokens_per_batch" and "max_length" in e.value.problems[0][1]
    with pytest.raises(ConfigError) as e:
        load_config(None, [*base, "method=dpo", "training.tokens_per_batch=4096"])
    assert e.value.problems[0][0] == "training.tokens_per_batch" and "pairs" in e.value.problems[0][1]


@pytest.mark.slow
def test_a_run_with_a_token_budget_trains_and_logs_its_plan(tiny_model, chat_data, tmp_path):
    from finetune.config import load_config
    from finetune.training.recipe import train

    run = train(load_config(None, [f"model={tiny_model}", f"data.train={chat_data['train']}",
                                   f"output_dir={tmp_path / 'run'}", "training.max_steps=4",
                                   "training.tokens_per_batch=512", "training.report_to=[none]", "max_length=256"]))
    mem = json.loads((run / "run.json").read_text())["memory"]
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    rows, per_row = (int(x) for x in mem["batch"].split(" tokens")[0].split(" x "))
    assert rows * per_row <= 512


def _auto_cfg(tiny_model, chat_data, tmp_path, *over):
    from finetune.config import load_config

    return load_config(None, [f"model={tiny_model}", f"data.train={chat_data['train']}",
                              f"output_dir={tmp_path / 'run'}", "max_length=128", "training.tokens_per_batch=auto",
                              "training.tokens_per_step=4096", "training.report_to=[none]", *over])


def _plan_of_rows(cfg, rows: int) -> float:
    import dataclasses

    from finetune.plan.memory import ModelShape, make_plan, resolve_model_config, setup_from_config

    raw, src = resolve_model_config(cfg.model)
    s = setup_from_config(cfg, device="cpu", device_memory=1 << 40)
    return make_plan(ModelShape.from_config(raw, src), dataclasses.replace(s, micro_batch=rows, seq_len=cfg.max_length),
                     alternatives=False).device_total


def test_auto_picks_the_largest_budget_the_plan_fits_and_keeps_the_step(tiny_model, chat_data, tmp_path):
    from finetune.config import ConfigError
    from finetune.plan.command import resolve_token_budget

    cfg = _auto_cfg(tiny_model, chat_data, tmp_path)
    margin = cfg.training.memory_margin
    for rows in (2, 5):  # memory for exactly `rows` max_length rows (and a little), with the margin spare
        mem = int(_plan_of_rows(cfg, rows) / (1 - margin)) + 1
        budget, accum, said = resolve_token_budget(cfg, device="cpu", device_memory=mem)
        assert (rows - 1) * 128 < budget <= rows * 128 or budget * accum <= 4096
        assert budget * accum <= 4096 and budget * (accum - 1) < 4096 and budget >= 128
        assert _plan_of_rows(cfg, -(-budget // 128)) <= (1 - margin) * mem
        assert f"x grad_accum {accum} x 1 rank(s) = {budget * accum}" in said
    big, accum, _ = resolve_token_budget(cfg, device="cpu", device_memory=1 << 40)
    assert (big, accum) == (4096, 1), "ample memory: the whole step in one micro-batch"
    with pytest.raises(ConfigError, match="not even one row"):
        resolve_token_budget(cfg, device="cpu", device_memory=int(_plan_of_rows(cfg, 1) / 2))


@pytest.mark.slow
def test_an_auto_budget_run_trains_with_the_budget_its_memory_plan_fits(tiny_model, chat_data, tmp_path, monkeypatch):
    """The CPU's 'device memory' is what psutil says is available: made small here, the run picks a
    smaller budget and more accumulation, keeps the step within the configured tokens, and trains."""
    import types

    import psutil

    from finetune.training.recipe import train

    cfg = _auto_cfg(tiny_model, chat_data, tmp_path, "training.max_steps=3")
    mem = int(_plan_of_rows(cfg, 3) / (1 - cfg.training.memory_margin)) + 1
    real = psutil.virtual_memory
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(**{**real()._asdict(), "available": mem}))
    run = train(cfg)
    info = json.loads((run / "run.json").read_text())
    import yaml

    saved = yaml.safe_load((run / "config.yaml").read_text())["training"]
    budget, accum = saved["tokens_per_batch"], saved["grad_accum"]
    # A step holds up to budget x accum tokens: at most tokens_per_step, and one more micro-batch would pass it.
    assert 256 < budget <= 384 and budget * accum <= 4096 < budget * (accum + 1), saved
    assert saved["tokens_per_step"] is None and "tokens_per_batch auto" in info["token_budget"]
    assert info["memory"]["memory_plan_bytes"] <= (1 - cfg.training.memory_margin) * mem


@pytest.fixture(scope="module")
def limit_run_config(tmp_path_factory):
    """A model whose activations dominate its memory (hidden 256, 4 layers: about 1 GiB for an 8,192-token
    micro-batch on CPU) and enough chats for two 8,192-token steps."""
    from finetune.tiny import build_tiny_model
    from tests.conftest import make_chat_examples, write_jsonl

    d = tmp_path_factory.mktemp("memory_limit")
    data = write_jsonl(d / "train.jsonl", make_chat_examples(600, seed=0))
    model = build_tiny_model(d / "model", [data], vocab_size=512, hidden_size=256, layers=4, heads=4, kv_heads=2)
    cfg = d / "train.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": str(model), "data": {"train": str(data)}, "output_dir": str(d / "run"), "overwrite": True,
        "max_length": 256, "seed": 0, "eval": {"after_train": False},
        "training": {"max_steps": 2, "logging_steps": 1, "report_to": ["none"]}}))
    return cfg


def _under_limit(cfg, headroom: float, inflate: float, *overrides, env: dict | None = None) -> dict:
    child = Path(__file__).with_name("memory_limit_child.py")
    proc = subprocess.run([sys.executable, str(child), str(cfg), str(headroom), str(inflate), *overrides],
                          capture_output=True, text=True, timeout=900, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                               **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["log"] = proc.stdout + proc.stderr
    run = cfg.parent / "run"
    if out["ok"]:
        out["config"] = yaml.safe_load((run / "config.yaml").read_text())["training"]
        out["info"] = json.loads((run / "run.json").read_text())
        out["steps"] = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    return out


@pytest.mark.slow
def test_auto_trains_under_a_real_memory_limit_where_the_whole_step_runs_out(limit_run_config):
    """Under an address-space limit (RLIMIT_AS) that leaves room for 70% of the plan of one micro-batch
    holding the whole 8,192-token step: that micro-batch really runs out of memory (forced past the
    plan's refusal), while `tokens_per_batch: auto` reads the limit, picks a budget that fits and
    trains, with budget x grad_accum = tokens_per_step exactly. A plan that believed it had three
    times the memory gets the out-of-memory error in its first two steps and retries once with half the
    budget and twice the accumulation, saying so, and trains the same tokens per step."""
    step = ["training.tokens_per_step=8192"]
    refused = _under_limit(limit_run_config, 0.7, 1, "training.tokens_per_batch=8192")
    assert not refused["ok"] and "predicted not to fit" in refused["error"], refused["log"][-2000:]
    whole = _under_limit(limit_run_config, 0.7, 1, "training.tokens_per_batch=8192", "force=true")
    assert not whole["ok"] and "ran out of memory in the first two optimizer steps" in whole["error"], whole["log"][-2000:]
    assert "training.tokens_per_batch" in whole["error"] and "set it to auto" in whole["error"]  # fixed: not changed

    auto = _under_limit(limit_run_config, 0.7, 1, "training.tokens_per_batch=auto", *step)
    assert auto["ok"], auto["log"][-3000:]
    budget, accum = auto["config"]["tokens_per_batch"], auto["config"]["grad_accum"]
    assert budget < 8192 and accum >= 2 and budget * accum == 8192, auto["config"]
    assert "RLIMIT_AS" in auto["info"]["token_budget"] and "retried" not in auto["info"]["token_budget"]
    assert len(auto["steps"]) == 2 and all(math.isfinite(r["loss"]) for r in auto["steps"])

    # The retry loads the model again within the same limit. glibc keeps freed tensors' address space
    # mapped inside its heaps (what RLIMIT_AS counts; a GPU's caching allocator and a cgroup's resident
    # limit get theirs back), so this leg has large allocations mapped on their own and unmapped when freed.
    retried = _under_limit(limit_run_config, 0.7, 3, "training.tokens_per_batch=auto", *step,
                           env={"MALLOC_MMAP_THRESHOLD_": "131072"})
    assert retried["ok"], retried["log"][-3000:]
    said = retried["info"]["token_budget"]
    assert "tokens_per_batch auto: 8192" in said and "retried: out of memory in the first two optimizer steps" in said
    assert (retried["config"]["tokens_per_batch"], retried["config"]["grad_accum"]) == (4096, 2)
    assert "retried once with tokens_per_batch 4096 x grad_accum 2" in retried["log"]
    assert len(retried["steps"]) == 2 and all(math.isfinite(r["loss"]) for r in retried["steps"])


def test_batch_size_auto_is_checked_with_the_key_to_fix(tiny_model, chat_data, tmp_path):
    from finetune.config import ConfigError, load_config

    base = [f"model={tiny_model}", f"data.train={chat_data['train']}", f"output_dir={tmp_path / 'run'}"]
    for over, key, words in ((["training.batch_size=auto"], "training.examples_per_step", "needs"),
                             (["training.examples_per_step=64"], "training.examples_per_step", "only used with"),
                             (["training.batch_size=auto", "training.examples_per_step=64", "training.tokens_per_batch=512"],
                              "training.batch_size", "set one of them")):
        with pytest.raises(ConfigError) as err:
            load_config(None, base + over)
        assert key in str(err.value) and words in str(err.value), str(err.value)


def test_batch_size_auto_picks_the_most_examples_the_plan_fits_for_the_longest_one(tiny_model, chat_data, tmp_path):
    """Planned for rows of the data's longest example (a padded batch is never longer), not of
    max_length; grad_accum keeps examples_per_step, exactly when a divisor is at hand."""
    import dataclasses

    from finetune.config import load_config
    from finetune.plan.command import resolve_batch_size
    from finetune.plan.memory import ModelShape, make_plan, resolve_model_config, setup_from_config

    cfg = load_config(None, [f"model={tiny_model}", f"data.train={chat_data['train']}", f"output_dir={tmp_path / 'run'}",
                             "max_length=512", "training.batch_size=auto", "training.examples_per_step=64",
                             "training.report_to=[none]"])
    raw, src = resolve_model_config(cfg.model)
    shape = ModelShape.from_config(raw, src)
    s = setup_from_config(cfg.model_copy(update={"training": cfg.training.model_copy(update={"batch_size": 1})}),
                          device="cpu", device_memory=1 << 40)
    plan = lambda rows, seq: make_plan(shape, dataclasses.replace(s, micro_batch=rows, seq_len=seq),  # noqa: E731
                                       alternatives=False).device_total
    margin = cfg.training.memory_margin
    mem = int(plan(12, 100) / (1 - margin)) + 1  # room for 12 rows of the longest example (100 tokens)
    bs, accum, said = resolve_batch_size(cfg, device="cpu", device_memory=mem, longest=100)
    assert 8 <= bs <= 12 and bs * accum == 64 and plan(bs, 100) <= (1 - margin) * mem, (bs, accum)
    assert f"batch_size auto: {bs}" in said and "= 64 examples per optimizer step (examples_per_step 64)" in said
    # without the data (or packed), rows of max_length: fewer fit
    bs_worst, _, _ = resolve_batch_size(cfg, device="cpu", device_memory=mem)
    assert bs_worst < bs and plan(bs_worst, 512) <= (1 - margin) * mem
    assert resolve_batch_size(cfg, device="cpu", device_memory=1 << 40, longest=100)[:2] == (64, 1)


@pytest.mark.slow
def test_a_batch_size_auto_run_trains_with_what_its_plan_fits(tiny_model, chat_data, tmp_path, monkeypatch):
    """End to end: the CPU's memory made small, `batch_size: auto` trains with the batch size the
    plan fits for the data's longest example and the accumulation that keeps examples_per_step;
    config.yaml records both, run.json the decision."""
    import types

    import psutil

    from finetune.config import load_config
    from finetune.training.recipe import train

    cfg = load_config(None, [f"model={tiny_model}", f"data.train={chat_data['train']}", f"output_dir={tmp_path / 'run'}",
                             "max_length=256", "training.batch_size=auto", "training.examples_per_step=32",
                             "training.max_steps=2", "training.report_to=[none]"])
    real = psutil.virtual_memory
    mem = int(_plan_of_rows(cfg, 4) / (1 - cfg.training.memory_margin)) + 1  # 4 rows of max_length; more of the data's
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(**{**real()._asdict(), "available": mem}))
    run = train(cfg)
    saved = yaml.safe_load((run / "config.yaml").read_text())["training"]
    info = json.loads((run / "run.json").read_text())
    assert saved["batch_size"] * saved["grad_accum"] == 32 and 4 <= saved["batch_size"] < 32, saved
    assert saved["examples_per_step"] is None and f"batch_size auto: {saved['batch_size']}" in info["batch_size_auto"]
    assert info["memory"]["memory_plan_bytes"] <= (1 - cfg.training.memory_margin) * mem

