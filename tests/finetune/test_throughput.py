"""Throughput and MFU in every run (finetune.training.throughput): the FLOPs are counted from the
model and the batches, and add up to the Trainer's own token count."""

from __future__ import annotations

import json

import pytest


def test_model_flops_counts_frozen_and_trainable_matmul_weights(tiny_model):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from finetune.training.throughput import model_flops

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    c = model.config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    h, i, V, L = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_hidden_layers
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * i
    full = model_flops(model)
    # every linear layer and the LM head (tied or not: its matmul runs), no embedding lookup
    assert (full.frozen, full.trainable) == (0, L * per_layer + h * V)
    assert full.per_token() == full.per_token("6n") == 6 * (L * per_layer + h * V)
    assert (full.attn_layers, full.attn_width) == (L, q)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    f = model_flops(lora)
    assert f.frozen == L * per_layer + h * V  # the base layers, now frozen
    assert f.trainable == L * 4 * ((h + q) + (h + kv))  # A (in x r) and B (r x out) of q and v
    assert f.per_token() == 4 * f.frozen + 6 * f.trainable < f.per_token("6n")
    assert f.attention(10.0) == 12 * L * q * 10.0


def test_batch_counts_padded_packed_and_pairs():
    import torch

    from finetune.training.throughput import batch_counts

    ids = torch.ones(2, 5, dtype=torch.long)
    padded = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
              "labels": torch.tensor([[-100, 5, 5, -100, -100], [-100, -100, 5, 5, 5]])}
    assert batch_counts(padded).tolist() == [8.0, 5.0, 3**2 + 5**2]
    # packed: one row, examples of 3, 4 and 2 tokens (position_ids restart at 0), no mask
    packed = {"input_ids": torch.ones(1, 9, dtype=torch.long),
              "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0, 1]]),
              "labels": torch.tensor([[-100, 1, 1, -100, -100, 1, 1, -100, 1]])}
    assert batch_counts(packed).tolist() == [9.0, 5.0, 9 + 16 + 4]
    # preference pairs: a completion mask, no labels
    pairs = {"input_ids": ids, "attention_mask": torch.ones(2, 5, dtype=torch.long),
             "completion_mask": torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 1, 1]])}
    assert batch_counts(pairs).tolist() == [10.0, 5.0, 50.0]
    assert batch_counts({"pixel_values": ids}) is None


def test_device_peak_names_the_gpu_or_measures(monkeypatch):
    import torch

    from finetune.training import throughput

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 PCIe")
    assert throughput.device_peak("cuda:0") == (756e12, "NVIDIA H100 PCIe: dense bf16 peak 756 TFLOP/s (datasheet)")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H200")
    assert throughput.device_peak("cuda:0")[0] == 989e12
    flops, what = throughput.device_peak("cpu")
    assert flops > 1e9 and what.startswith("CPU: measured fp32 matmul")


@pytest.mark.slow
def test_every_training_log_has_throughput_and_mfu_that_add_up(tiny_model, chat_data, tmp_path):
    """The tokens counted per micro-batch add up to the Trainer's own count; TFLOP/s is the FLOPs of
    those tokens (frozen 4N + trainable 6N + attention) over the time; MFU is that over the peak."""
    from finetune.config import load_config
    from finetune.training.recipe import train

    run = train(load_config(None, [f"model={tiny_model}", f"data.train={chat_data['train']}",
                                   f"output_dir={tmp_path / 'run'}", "training.max_steps=4", "training.logging_steps=1",
                                   "training.batch_size=4", "training.report_to=[none]"]))
    logs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(logs) == 4
    for m in logs:
        assert m["tokens_per_s"] > m["trained_tokens_per_s"] > 0 and m["tflops"] > 0 and m["peak_mem_gib"] > 0
        assert 0 < m["mfu"] < m["mfu_6n"] < 1
    t = json.loads((run / "run.json").read_text())["throughput"]
    assert t["tokens"] == logs[-1]["num_input_tokens_seen"]
    assert t["tokens_per_s"] == pytest.approx(t["tokens"] / t["seconds"], rel=1e-3)
    fl = t["flops_per_token"]
    assert fl["kit"] == 4 * t["matmul_weights"]["frozen"] + 6 * t["matmul_weights"]["trainable"]
    # the attention term is small here but present: TFLOP/s x time > tokens x FLOPs per token
    assert t["tflops_per_device"] * 1e12 * t["seconds"] >= t["tokens"] * fl["kit"] * 0.999
    assert "CPU: measured fp32 matmul" in t["mfu_peak"]
