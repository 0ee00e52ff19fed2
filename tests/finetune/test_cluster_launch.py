"""Cluster setups that used to break, launched on 2 CPU processes the way a cluster launches them
(`accelerate launch --config_file configs/accelerate/... --num_processes 2 -m finetune train`):
DDP + QLoRA + gradient checkpointing, ZeRO-3 with the post-training eval, and resuming a 2-rank
run on 1 rank. The tiny model's ChatML template has no generation markers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.finetune.test_distributed import (
    REPO,
    _check_adapter,
    _check_two_ranks_trained,
    _run_ok,
    _show,
    _write_config,
    needs_deepspeed,
)


def _single(config, *overrides):
    """The same run on ONE process (no launcher)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "finetune", "train", str(config), *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def _losses(run):
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_qlora_with_gradient_checkpointing(tiny_model, chat_data, tmp_path):
    """The standard multi-GPU QLoRA setup; it failed in the first backward with "Expected to mark a
    variable ready only once" (reentrant checkpointing + find_unused_parameters=True)."""
    pytest.importorskip("bitsandbytes")
    config, run = _write_config(tmp_path, tiny_model, chat_data, adapter="qlora",
                                training={"gradient_checkpointing": True})
    res = _run_ok("ddp.yaml", config)
    probes = _check_two_ranks_trained(run, res)
    assert all("Linear4bit" in p["module_types"] for p in probes), probes[0]["module_types"]
    assert "(qlora)" in res.stdout and "ZeRO stage off" in res.stdout, _show(res)
    _check_adapter(run, tiny_model)


@needs_deepspeed
@pytest.mark.distributed
@pytest.mark.slow
def test_zero3_with_the_post_training_eval(tiny_model, chat_data, tmp_path):
    """It crashed after training: the eval's from_pretrained entered zero.Init with the run's
    DeepSpeed config after the process group was gone."""
    config, run = _write_config(tmp_path, tiny_model, chat_data, lora={"r": 16}, eval={
        "after_train": True, "data": str(chat_data["eval"]), "max_examples": 6, "max_new_tokens": 4,
        "metrics": ["exact_match"]})
    res = _run_ok("deepspeed_zero3.yaml", config)
    _check_two_ranks_trained(run, res, replicated=False)
    assert "post-training eval in a fresh process" in res.stdout, _show(res)
    report = json.loads((run / "eval" / "report.json").read_text())
    base, tuned = report["models"]["base"], report["models"]["tuned"]
    assert tuned["extrinsic"]["n"] == 6 and base["intrinsic"]["tokens"] == tuned["intrinsic"]["tokens"] > 0
    assert tuned["intrinsic"]["nll"] < base["intrinsic"]["nll"], report  # the trained adapter was scored
    assert report["meta"]["world_size"] == 1 and report["meta"]["device"] == "cpu"


@needs_deepspeed
@pytest.mark.distributed
@pytest.mark.slow
def test_a_zero2_run_of_two_ranks_resumed_on_one_stops_naming_both(tiny_model, chat_data, tmp_path):
    config, run = _write_config(tmp_path, tiny_model, chat_data, deepspeed="configs/deepspeed/zero2.json")
    _run_ok("deepspeed_zero2.yaml", config)
    res = _single(config, "resume=true", "training.max_steps=12")
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-4000:]
    assert ("were written with world size 2, ZeRO-2" in res.stderr and "this launch has world size 1, ZeRO-2"
            in res.stderr), res.stderr[-3000:]
    assert "Traceback" not in res.stderr


@pytest.mark.distributed
@pytest.mark.slow
def test_a_ddp_run_of_two_ranks_continues_on_one_with_the_same_batches(tiny_model, chat_data, tmp_path):
    """2 ranks x batch 4 -> 1 rank x batch 4 x grad_accum 2: the resumed steps see the same
    examples, so their losses equal the uninterrupted 2-rank run's (no dropout here)."""
    config, run = _write_config(tmp_path, tiny_model, chat_data, lora={"r": 8, "dropout": 0.0},
                                training={"save_steps": 4})
    _run_ok("ddp.yaml", config)
    straight = _losses(run)
    (run / "checkpoints" / "checkpoint-8" / "COMPLETE").unlink()  # as if killed before step 8's save
    res = _single(config, "resume=true", "training.grad_accum=2")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert "Resuming across setups" in res.stdout and "checkpoint-4" in res.stdout, res.stdout[-3000:]
    resumed = _losses(run)
    assert sorted(resumed) == list(range(1, 9)), resumed
    for step in range(5, 9):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-3), (step, resumed, straight)
    assert json.loads((run / "run.json").read_text())["parallel"]["world_size"] == 1


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_tokenize_once_and_share_the_cache(tiny_model, chat_data, tmp_path):
    """Local rank 0 builds the data cache, rank 1 waits for it and memory-maps it; a second launch
    on the same data builds nothing."""
    data = tmp_path / "data" / "train.jsonl"
    data.parent.mkdir()
    data.write_text(chat_data["train"].read_text())
    config, run = _write_config(tmp_path, tiny_model, {"train": data}, training={"max_steps": 4})
    res = _run_ok("ddp.yaml", config)
    builds = [json.loads(ln) for ln in (data.parent / ".finetune-cache" / "builds.log").read_text().splitlines()]
    assert len(builds) == 1 and builds[0]["rank"] == 0, builds
    assert "world size       2" in res.stdout
    _run_ok("ddp.yaml", config, "overwrite=true")
    assert len((data.parent / ".finetune-cache" / "builds.log").read_text().splitlines()) == 1
