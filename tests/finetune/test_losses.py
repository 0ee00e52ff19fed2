"""The chunked LM-head loss equals the model's own loss over full logits, and so do its gradients."""

from __future__ import annotations

import copy

import pytest
import torch


def _batch(tok, chat_data, n=6, max_length=128):
    from finetune.data.chat_template import encode_chat
    from finetune.data.files import pad_collate, read_chat_jsonl

    rows = [encode_chat(tok, r["messages"], max_length=max_length) for r in read_chat_jsonl(chat_data["train"])[:n]]
    return pad_collate(tok.pad_token_id)([{"input_ids": e.input_ids, "labels": e.labels} for e in rows])


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("modules_to_save", [None, ["lm_head"]])
@pytest.mark.parametrize("chunk_bytes", [1, 64 << 10])
def test_chunked_loss_and_gradients_equal_the_full_logits_path(tiny_model, chat_data, modules_to_save, chunk_bytes):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.models.losses import install_chunked_loss

    tok = AutoTokenizer.from_pretrained(tiny_model)
    b = _batch(tok, chat_data)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    chunked_base = copy.deepcopy(base)
    assert install_chunked_loss(chunked_base, chunk_bytes=chunk_bytes)
    lcfg = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, lora_dropout=0.0,
                      modules_to_save=modules_to_save)
    torch.manual_seed(1)
    full = get_peft_model(base, lcfg)
    torch.manual_seed(1)
    chunked = get_peft_model(chunked_base, copy.deepcopy(lcfg))
    n_items = int((b["labels"][:, 1:] != -100).sum()) + 7  # as gradient accumulation passes it
    for m in (full, chunked):
        m.train()
        out = m(**b, num_items_in_batch=n_items)
        out.loss.backward()
        m.loss_value = out.loss.item()
    assert chunked.loss_value == pytest.approx(full.loss_value, rel=1e-5)
    gf, gc = _grads(full), _grads(chunked)
    assert gf.keys() == gc.keys() and gf
    for name in gf:
        assert torch.allclose(gc[name], gf[name], rtol=1e-4, atol=1e-7), name
    if modules_to_save:
        assert any("modules_to_save" in n for n in gc)  # the trained head got its gradient too
    # Without labels the model is untouched: generation still gets logits.
    with torch.no_grad():
        ids = b["input_ids"][:1, :8]
        assert torch.equal(chunked(input_ids=ids).logits, full(input_ids=ids).logits)


def test_no_full_vocabulary_logits_in_a_training_step(tiny_model, chat_data):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.models.losses import install_chunked_loss

    tok = AutoTokenizer.from_pretrained(tiny_model)
    b = _batch(tok, chat_data)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    vocab = model.config.vocab_size
    install_chunked_loss(model, chunk_bytes=16 * 4 * vocab)
    shapes = []
    model.lm_head.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    model(**b).loss.backward()
    assert shapes and all(s[0] <= 16 and len(s) == 2 for s in shapes), shapes
    assert sum(s[0] for s in shapes) <= 3 * int((b["labels"][:, 1:] != -100).sum())  # fwd, argmax, recompute


@pytest.mark.slow
def test_a_run_with_the_chunked_loss_matches_one_with_the_full_loss(tiny_model, chat_data, tmp_path):
    import json

    from finetune.config import load_config
    from finetune.training.recipe import train

    losses = {}
    for impl in ("chunked", "full"):
        run = train(load_config(None, [
            f"model={tiny_model}", f"data.train={chat_data['train']}", f"data.eval={chat_data['eval']}",
            f"output_dir={tmp_path / impl}", f"training.loss={impl}", "training.max_steps=6", "training.eval_steps=3",
            "training.batch_size=8", "training.logging_steps=1", "training.report_to=[none]", "max_length=128",
            "lora.dropout=0", "seed=0"]))
        rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
        losses[impl] = ([r["loss"] for r in rows if "loss" in r], [r["eval_loss"] for r in rows if "eval_loss" in r])
    (tc, ec), (tf, ef) = losses["chunked"], losses["full"]
    assert len(tc) == len(tf) == 6 and len(ec) == len(ef) == 2
    assert tc == pytest.approx(tf, rel=1e-4) and ec == pytest.approx(ef, rel=1e-4)
