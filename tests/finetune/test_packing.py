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


def _lora_model(tiny_model, attn: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation=attn)
    model.config.use_cache = False
    lora = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM"))
    for name, p in lora.named_parameters():  # B = 0 at init would give A no gradient: make both matter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    lora.train()
    return lora


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_give_the_padded_loss_and_lora_gradients_for_each_cpu_attention(tiny_model, chat_data, tmp_path,
                                                                                     attn):
    """Every attention implementation the kit can select on CPU (flex_attention cannot train there):
    the packed row's per-token loss and every LoRA gradient equal the padded batch's (fp32, 1e-5)."""
    import torch
    from transformers import AutoTokenizer

    from finetune.training.recipe import make_collator

    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = [json.loads(x)["messages"] for x in chat_data["train"].read_text().splitlines()[:6]]
    feats = [{"input_ids": e.input_ids, "labels": e.labels} for e in (encode_chat(tok, m) for m in rows)]
    cfg = load_config(None, [f"model={tiny_model}", f"data.train={chat_data['train']}",
                             f"output_dir={tmp_path / 'r'}", "packing=true", f"attn_implementation={attn}"])
    packed, padded = make_collator(cfg, tok)(feats), pad_collate(tok.pad_token_id)(feats)
    model = _lora_model(tiny_model, attn)
    params = [p for p in model.parameters() if p.requires_grad]
    lp = model(**packed).loss
    gp = torch.autograd.grad(lp, params)
    lu = model(**padded).loss
    gu = torch.autograd.grad(lu, params)
    assert lp.item() == pytest.approx(lu.item(), rel=1e-5)
    worst = max(float((a - b).abs().max() / (b.abs().max() + 1e-12)) for a, b in zip(gp, gu))
    assert worst < 1e-5, worst


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_changing_one_example_changes_no_logit_of_its_neighbours_in_the_row(tiny_model, chat_data, tmp_path, attn):
    import torch
    from transformers import AutoTokenizer

    from finetune.training.recipe import make_collator

    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = [json.loads(x)["messages"] for x in chat_data["train"].read_text().splitlines()[:3]]
    feats = [{"input_ids": e.input_ids, "labels": e.labels} for e in (encode_chat(tok, m) for m in rows)]
    cfg = load_config(None, [f"model={tiny_model}", f"data.train={chat_data['train']}",
                             f"output_dir={tmp_path / 'r'}", "packing=true", f"attn_implementation={attn}"])
    collate = make_collator(cfg, tok)
    changed = [dict(f) for f in feats]
    changed[1] = {"input_ids": [(t + 7) % 300 + 5 for t in feats[1]["input_ids"]], "labels": feats[1]["labels"]}
    model = _lora_model(tiny_model, attn).eval()
    with torch.no_grad():
        a = model(**collate(feats)).logits[0]
        b = model(**collate(changed)).logits[0]
    n0, n1 = len(feats[0]["input_ids"]), len(feats[1]["input_ids"])
    assert not torch.allclose(a[n0:n0 + n1], b[n0:n0 + n1])  # the changed example's own logits move
    assert torch.equal(a[:n0], b[:n0]) and torch.allclose(a[n0 + n1:], b[n0 + n1:], atol=1e-6, rtol=0)


def test_a_packed_row_with_a_2d_mask_is_refused_not_trained_across_examples(tiny_model, chat_data, tmp_path):
    import torch

    from finetune.methods.trainer import PackedRows

    ok = PackedRows(lambda feats: {"input_ids": torch.ones(1, 4), "position_ids": torch.tensor([[0, 1, 0, 1]])})
    assert "position_ids" in ok([])
    with pytest.raises(RuntimeError, match="2-D attention_mask"):
        PackedRows(lambda feats: {"input_ids": torch.ones(1, 4), "position_ids": torch.tensor([[0, 1, 0, 1]]),
                                  "attention_mask": torch.ones(1, 4)})([])
    with pytest.raises(RuntimeError, match="without position_ids"):
        PackedRows(lambda feats: {"input_ids": torch.ones(1, 4)})([])


def test_packing_auto_is_decided_per_device_and_method(tiny_model, chat_data, tmp_path):
    from finetune.config import ConfigError
    from finetune.training.launch import packing_settings

    def cfg(*over):
        return load_config(None, [f"model={tiny_model}", f"data.train={chat_data['train']}",
                                  f"output_dir={tmp_path / 'r'}", *over])

    assert cfg().packing == "auto"
    assert packing_settings(cfg(), "cpu")[:2] == (False, None)
    on, attn, said = packing_settings(cfg(), "cuda:0")
    assert (on, attn) == (True, "flex_attention") and "document mask" in said
    assert packing_settings(cfg("attn_implementation=flash_attention_2"), "cuda:0")[:2] == (True, "flash_attention_2")
    off, attn, said = packing_settings(cfg("attn_implementation=sdpa"), "cuda:0")
    assert (off, attn) == (False, "sdpa") and "dense mask" in said
    assert packing_settings(cfg("packing=true", "attn_implementation=sdpa"), "cuda:0")[:2] == (True, "sdpa")
    assert packing_settings(cfg("packing=true"), "cpu")[:2] == (True, None)  # sdpa's block-diagonal mask
    assert packing_settings(cfg("packing=false"), "cuda:0")[0] is False
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    dpo = load_config(None, [f"model={tiny_model}", f"data.train={pairs}", f"output_dir={tmp_path / 'd'}", "method=dpo"])
    off, _, said = packing_settings(dpo, "cuda:0")
    assert off is False and "scores each sequence on its own" in said
    with pytest.raises(ConfigError, match="flex_attention cannot train on CPU"):
        packing_settings(cfg("attn_implementation=flex_attention"), "cpu")


def test_a_hub_flash_kernel_in_the_local_cache_is_preferred_to_flex(tiny_model, chat_data, tmp_path, monkeypatch):
    """On CUDA, `packing: auto` with no attention named takes the best Hub flash-attention kernel whose
    build is already cached (looked up with local_files_only: nothing downloads), else flex_attention.
    A stand-in CUDA device and cache here; the kernel itself runs in the gpu tests."""
    kernels = pytest.importorskip("kernels")
    import torch

    from finetune.training.launch import packing_settings

    cfg = load_config(None, [f"model={tiny_model}", f"data.train={chat_data['train']}", f"output_dir={tmp_path / 'r'}"])
    cached: set[str] = set()
    asked: list[tuple] = []

    def install_kernel(repo, *, version=None, local_files_only=False, **kw):
        asked.append((repo, version, local_files_only))
        if repo not in cached:
            raise FileNotFoundError(repo)
        return tmp_path / repo

    monkeypatch.setattr(kernels, "install_kernel", install_kernel)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    capability = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[0])
    assert packing_settings(cfg, "cuda:0")[:2] == (True, "flex_attention")  # nothing cached
    assert asked and all(local for _, _, local in asked)  # only the local cache is read
    cached |= {"kernels-community/flash-attn2", "kernels-community/flash-attn3"}
    on, attn, said = packing_settings(cfg, "cuda:0")
    assert (on, attn) == (True, "kernels-community/flash-attn3") and "a Hub kernel in the local cache" in said
    from transformers.integrations.hub_kernels import get_attn_kernel_version

    # the version transformers loads for that repository (its release decides: 2 in transformers 5.25)
    assert ("kernels-community/flash-attn3", get_attn_kernel_version("kernels-community/flash-attn3"), True) in asked
    capability[0] = (8, 6)  # Ampere: no FlashAttention-3 build runs there
    assert packing_settings(cfg, "cuda:0")[1] == "kernels-community/flash-attn2"
    assert packing_settings(cfg, "gpu")[1] == "flex_attention"  # the plan looks nothing up
    asked.clear()
    assert packing_settings(cfg, "cpu")[:2] == (False, None) and not asked
    assert packing_settings(load_config(None, [f"model={tiny_model}", f"data.train={chat_data['train']}",
                                              f"output_dir={tmp_path / 'r'}", "attn_implementation=flash_attention_2"]),
                            "cuda:0")[1] == "flash_attention_2"  # the config's choice stands
