"""Packing: several examples per row, no attention across boundaries, the same loss as unpacked."""

import json

import pytest
import yaml

from finetune.config import load_config
from finetune.data.chat_template import encode_chat
from finetune.data.files import pad_collate


def test_packed_loss_equals_unpacked_loss(tiny_model, chat_data, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.training.recipe import make_collator

    tok = AutoTokenizer.from_pretrained(tiny_model)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model.config.use_cache = False
    model.train()  # the training path, dropout is 0 in the tiny config
    rows = [json.loads(x)["messages"] for x in chat_data["train"].read_text().splitlines()[:6]]
    feats = [{"input_ids": e.input_ids, "labels": e.labels} for e in (encode_chat(tok, m) for m in rows)]
    cfg = load_config(None, [f"model={tiny_model}", f"data.train={chat_data['train']}",
                             f"output_dir={tmp_path / 'r'}", "packing=true"])
    packed = make_collator(cfg, tok)(feats)
    padded = pad_collate(tok.pad_token_id)(feats)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    assert packed["input_ids"].shape[1] == sum(len(f["input_ids"]) for f in feats)  # no padding at all
    assert (padded["attention_mask"] == 0).any()  # the unpacked batch does pad
    # Both losses are token-weighted means over the same trained tokens.
    assert int((packed["labels"] != -100).sum()) == int((padded["labels"] != -100).sum())
    loss_packed = model(**packed).loss
    loss_padded = model(**padded).loss
    assert loss_packed.item() == pytest.approx(loss_padded.item(), rel=1e-5, abs=1e-6)
    # And gradients agree: nothing leaks across example boundaries.
    g1 = torch.autograd.grad(loss_packed, model.model.embed_tokens.weight)[0]
    g2 = torch.autograd.grad(model(**padded).loss, model.model.embed_tokens.weight)[0]
    assert torch.allclose(g1, g2, atol=1e-6)


@pytest.mark.slow
def test_training_with_packing(tiny_model, chat_data, tmp_path):
    from finetune.training.recipe import train

    cfg = {"model": str(tiny_model), "output_dir": str(tmp_path / "run"), "packing": True, "max_length": 128,
           "data": {"train": str(chat_data["train"]), "eval": str(chat_data["eval"])},
           "training": {"max_steps": 8, "batch_size": 8, "learning_rate": 3e-3, "logging_steps": 1,
                        "eval_steps": 4, "report_to": ["none"]}}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    run = train(load_config(p))
    logs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in logs if "loss" in m]
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert any("eval_loss" in m for m in logs)
