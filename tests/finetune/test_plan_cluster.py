"""What `finetune plan` says about the shipped real-model configs matches what they promise."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from finetune.plan.command import load_plan_config
from finetune.plan.memory import (
    GiB,
    ModelShape,
    make_plan,
    resolve_model_config,
    setup_from_config,
)

REPO = Path(__file__).resolve().parents[2]


def _plan(name: str, gpus_per_node: int, memory_gib: float, **change):
    cfg = load_plan_config(REPO / "configs" / "train" / name)
    raw, src = resolve_model_config(cfg.model)
    s = dataclasses.replace(setup_from_config(cfg, gpus_per_node=gpus_per_node), device_memory=memory_gib * GiB,
                            **change)
    return make_plan(ModelShape.from_config(raw, src), s)


def test_the_8b_qlora_config_fits_the_24gb_gpu_its_header_names():
    header = (REPO / "configs" / "train" / "llama3_8b_qlora.yaml").read_text().splitlines()[0]
    assert "24 GB" in header
    assert _plan("llama3_8b_qlora.yaml", 1, 24).fits


def test_qlora_under_zero3_counts_the_whole_4bit_model_loaded_on_every_rank():
    """Loading puts the whole quantized model on each rank before DeepSpeed partitions it, so more
    GPUs do not lower the peak below ~44 GB for a 70B model; 40 GB cards cannot take it."""
    plan8 = _plan("llama3_70b_qlora_zero3.yaml", 8, 80)
    assert plan8.fits
    peak = next(x for x in plan8.lines if x.name == "zero-3 QLoRA load peak")
    assert "before partitioning" in peak.note
    plan16 = _plan("llama3_70b_qlora_zero3.yaml", 16, 80)
    assert plan16.device_total >= 43 * GiB and plan8.device_total >= 43 * GiB
    assert not _plan("llama3_70b_qlora_zero3.yaml", 8, 40).fits
    # Without ZeRO-3 partitioning there is no such line: LoRA under ZeRO-3 loads under zero.Init.
    lora = _plan("llama3_70b_qlora_zero3.yaml", 8, 80, adapter="lora")
    assert not any(x.name == "zero-3 QLoRA load peak" for x in lora.lines)


def test_full_fine_tuning_without_deepspeed_is_planned_with_fp32_master_weights():
    """finetune train loads fp32 weights for it (bf16 autocast); the plan counts 4 B per weight."""
    from finetune.config import load_config

    cfg = load_config(None, [f"model={REPO / 'finetune' / 'model_configs'}", f"data.train={REPO / 'pyproject.toml'}",
                             "output_dir=/tmp/unused", "adapter=full"])  # no file is read by the plan setup
    s = setup_from_config(cfg)
    assert (s.weight_dtype, s.precision) == ("float32", "bf16")


def test_the_logits_line_follows_the_loss_implementation():
    """Chunked: one chunk of logits whatever the batch; full: [batch, seq, vocab] fp32 logits."""
    chunked = _plan("llama3_8b_qlora.yaml", 1, 24)
    full = _plan("llama3_8b_qlora.yaml", 1, 24, loss="full")
    line = {p: next(x for x in plan.lines if x.name == "activations: logits + loss")
            for p, plan in (("chunked", chunked), ("full", full))}
    assert "chunked" in line["chunked"].note and "training.loss=full" in line["full"].note
    assert line["full"].device > 20 * line["chunked"].device  # 128k vocabulary, 4 x 4,096 tokens
    assert chunked.fits and not full.fits
    bigger = _plan("llama3_8b_qlora.yaml", 1, 24, micro_batch=8)
    head8 = next(x for x in bigger.lines if x.name == "activations: logits + loss").device
    assert head8 < 2.1 * line["chunked"].device  # grows with the gathered hidden states only
