"""4-bit loading and evaluation on CPU, merged-model evaluation, merging a QLoRA adapter, and
adapters that do not fit their base model.

NF4 error on the tiny test model (hidden 64, 2 layers, random init), measured here on CPU with
bitsandbytes 0.50.2: base-only logits full vs 4-bit differ by about 0.07 at most (logits span
about +-0.7); eval perplexity moves by about 3e-4 relative. The tolerances below are set from
those figures, with headroom, and stated next to each assertion.
"""

from __future__ import annotations

import json

import pytest

from finetune.errors import AdapterError

pytestmark = pytest.mark.slow

PROMPT = "The red kettle costs $12. The blue lamp costs $40.\n\nHow much is the red kettle?"


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(ids, use_cache=False).logits.float()


def _n_linear4bit(model) -> int:
    import bitsandbytes as bnb

    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def test_load_for_inference_4bit_generates(trained_run):
    pytest.importorskip("bitsandbytes")
    from finetune import chat, load_for_inference

    model, tok = load_for_inference(trained_run / "adapter", quantize="4bit")
    assert _n_linear4bit(model) == 14  # 2 layers x 7 projections really are 4-bit
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    assert isinstance(chat(model, tok, [{"role": "user", "content": PROMPT}], max_new_tokens=4), str)


def test_eval_4bit_base_plus_adapter_is_close_to_full_precision(trained_run, chat_data, tmp_path):
    pytest.importorskip("bitsandbytes")
    from finetune.eval.evaluation import evaluate

    kw = dict(adapter=trained_run / "adapter", data=chat_data["eval"], max_new_tokens=2, metrics=["exact_match"])
    full = evaluate(output=tmp_path / "full", **kw)
    q4 = evaluate(output=tmp_path / "q4", quantize="4bit", **kw)
    assert q4["meta"]["quantize"] == "4bit"
    for label in ("base", "tuned"):
        a, b = full["models"][label]["intrinsic"], q4["models"][label]["intrinsic"]
        assert a["tokens"] == b["tokens"] and a["bytes"] == b["bytes"]
        # Measured NF4 shift ~3e-4 relative; 1e-2 leaves 30x headroom, yet a wrong (e.g.
        # unquantized-layer-dropped or adapter-less) model moves perplexity by far more (base vs tuned ~2x).
        assert b["perplexity"] == pytest.approx(a["perplexity"], rel=1e-2), (label, a, b)
        assert b["bits_per_byte"] == pytest.approx(a["bits_per_byte"], rel=1e-2), (label, a, b)
        assert b["nll_sum"] != a["nll_sum"]  # the 4-bit run really was quantized
    assert q4["models"]["tuned"]["intrinsic"]["perplexity"] < q4["models"]["base"]["intrinsic"]["perplexity"]


def test_eval_of_merged_model_equals_base_plus_adapter(trained_run, chat_data, tmp_path):
    from finetune import merge_adapter
    from finetune.eval.evaluation import evaluate

    merged = merge_adapter(trained_run / "adapter", tmp_path / "merged", dtype="float32")
    kw = dict(data=chat_data["eval"], max_new_tokens=4, metrics=["exact_match"])
    separate = evaluate(adapter=trained_run / "adapter", output=tmp_path / "a", **kw)
    folded = evaluate(model=str(merged), output=tmp_path / "m", **kw)
    want, got = separate["models"]["tuned"]["intrinsic"], folded["models"]["base"]["intrinsic"]
    assert got["tokens"] == want["tokens"]
    assert got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-4)
    assert got["bits_per_byte"] == pytest.approx(want["bits_per_byte"], rel=1e-4)
    assert got["perplexity"] != pytest.approx(separate["models"]["base"]["intrinsic"]["perplexity"], rel=1e-2)
    preds = {}
    for name in ("a", "m"):
        rows = [json.loads(ln) for ln in (tmp_path / name / "predictions.jsonl").read_text().splitlines()]
        preds[name] = [r["prediction"] for r in rows if r["model"] == ("tuned" if name == "a" else "base")]
    assert preds["a"] == preds["m"]  # the same greedy replies


def test_merge_of_a_qlora_adapter(tiny_model, chat_data, tmp_path):
    """An adapter trained on an NF4 base, merged into the dequantized NF4 base (the default for
    QLoRA adapters) and, on request, into the original full-precision base.

    dequantized merge = dequant(NF4(W)) + BA, which is what 4-bit base + adapter computes, so the two
    agree to kernel rounding: the bound is 10% of the measured base-only NF4 error (full vs 4-bit base
    logits). Merging into the original W instead (dequantize=False) gives W + BA exactly, i.e. full
    base + adapter to 1e-4, and differs from the trained 4-bit model by about the NF4 error.
    """
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from finetune import load_for_inference, merge_adapter
    from finetune.config import load_config
    from finetune.models.loading import load_base_model
    from finetune.training.recipe import train

    run = train(load_config(None, [
        f"model={tiny_model}", f"data.train={chat_data['train']}", f"output_dir={tmp_path / 'run'}",
        "adapter=qlora", "training.max_steps=6", "training.batch_size=8", "training.learning_rate=1e-2",
        "training.report_to=[none]", "max_length=128", "lora.r=8", "seed=0",
    ]))
    adapter = run / "adapter"
    merged = AutoModelForCausalLM.from_pretrained(merge_adapter(adapter, tmp_path / "merged", dtype="float32")).eval()
    merged_fp = AutoModelForCausalLM.from_pretrained(
        merge_adapter(adapter, tmp_path / "merged_fp", dtype="float32", dequantize=False)).eval()
    q4_tuned, tok = load_for_inference(adapter, quantize="4bit")
    assert _n_linear4bit(q4_tuned) == 14
    full_tuned, _ = load_for_inference(adapter, quantize=None)
    ids = tok([PROMPT], return_tensors="pt")["input_ids"]

    full_base = load_base_model(str(tiny_model), dtype="float32").eval()
    q4_base = load_base_model(str(tiny_model), dtype="float32", quantize="4bit").eval()
    base_full, base_q4 = _logits(full_base, ids), _logits(q4_base, ids)
    nf4_err = (base_full - base_q4).abs().max().item()
    assert 1e-3 < nf4_err < 0.5, nf4_err  # measured ~0.07: quantization happened and is sane

    m = _logits(merged, ids)
    adapter_shift = (m - base_q4).abs().max().item()
    assert adapter_shift > 1e-2, adapter_shift  # training moved the model; else the checks below are empty
    # Default (dequantized) merge reproduces the model that was trained: 4-bit base + adapter.
    # Exactly, on bitsandbytes' generic fp32 dequantize path (measured 3e-7 to 5e-7):
    q4_generic, _ = load_for_inference(adapter, quantize="4bit")
    for mod in q4_generic.modules():
        if hasattr(mod, "support_avx512bf16_for_cpu"):
            mod.support_avx512bf16_for_cpu = False
    assert (m - _logits(q4_generic, ids)).abs().max().item() < 1e-5
    # bitsandbytes' AVX512-BF16 CPU kernel (what eval mode uses where the layer sizes allow it)
    # rounds through bf16; that gap depends on the activations, so on the adapter: measured 0.003
    # and 0.016 for two adapters differing only in batch order, vs the NF4 error 0.067.
    gap = (m - _logits(q4_tuned, ids)).abs().max().item()
    assert gap <= 0.5 * nf4_err, (gap, nf4_err)
    # dequantize=False: original full-precision base + adapter, to float32 rounding.
    assert (_logits(merged_fp, ids) - _logits(full_tuned, ids)).abs().max().item() < 1e-4
    print(f"NF4 base-only max |dlogit| {nf4_err:.4f}; merged vs 4-bit+adapter {gap:.4f}; "
          f"adapter shift {adapter_shift:.4f}")


# ----------------------------------------------------------------------------------------------
# adapters that do not fit their base
# ----------------------------------------------------------------------------------------------
def _save_adapter(model, tokenizer_dir, out, base_dir, **lora_kw):
    """A PEFT adapter of `model`, saved with the tiny tokenizer and pointed at `base_dir`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **lora_kw)).save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base_dir)
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


def test_adapter_with_a_resized_vocabulary_is_a_clear_error(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from finetune import load_for_inference, merge_adapter

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    vocab = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(vocab + 10, mean_resizing=False)
    # Saved with the base's tokenizer, not the resized one it was trained with.
    adapter = _save_adapter(model, tiny_model, tmp_path / "adapter", tiny_model,
                            modules_to_save=["embed_tokens", "lm_head"])
    msg = rf"vocabulary mismatch: the adapter's embeddings have {vocab + 10} rows, expected {vocab}"
    with pytest.raises(AdapterError, match=msg) as err:
        load_for_inference(adapter)
    assert f"model.embed_tokens.weight: the adapter holds {vocab + 10} x 64, the base has {vocab} x 64" in str(err.value)
    with pytest.raises(AdapterError, match="vocabulary mismatch"):
        merge_adapter(adapter, tmp_path / "merged")


def test_adapter_from_another_model_size_is_a_clear_error(tiny_model, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from finetune import load_for_inference

    cfg = AutoConfig.from_pretrained(tiny_model)
    cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size = 32, 88, cfg.vocab_size + 7
    adapter = _save_adapter(AutoModelForCausalLM.from_config(cfg), tiny_model, tmp_path / "adapter", tiny_model)
    with pytest.raises(AdapterError, match="the adapter was trained on a base model with other layer sizes") as err:
        load_for_inference(adapter)
    assert ("model.layers.0.self_attn.q_proj: the adapter's LoRA A takes 32 input features, the base layer has 64"
            in str(err.value)), err.value
    assert f"the adapter's embeddings have {cfg.vocab_size} rows, expected {cfg.vocab_size - 7}" in str(err.value)
