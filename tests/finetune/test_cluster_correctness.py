"""Paths that decide whether a GPU cluster run is right, checked on CPU where they can run:
scoring on the device at scored positions only, the run's own precision and quantization,
4-bit storage vs DeepSpeed's dtype, resuming on another setup, adapters saved by plain PEFT,
no state left behind by a run. tests/gpu/ covers what needs CUDA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.config import ConfigError, load_config
from finetune.errors import RunDirError
from kitcore.runtime import Runtime

REPO = Path(__file__).resolve().parents[2]
CPU = Runtime(0, 0, 1, 1, "cpu", None)
GPU = Runtime(0, 0, 1, 1, "cuda:0", None)  # only its description: nothing here touches CUDA


def _cfg(tiny_model, chat_data, tmp_path, *over):
    return load_config(None, [f"model={tiny_model}", f"data.train={chat_data['train']}",
                              f"output_dir={tmp_path / 'run'}", "training.report_to=[none]", *over])


# ----------------------------------------------------------------------------------------------
# scoring: LM head in chunks, at scored positions only, on the device
# ----------------------------------------------------------------------------------------------
def _batch(tok, chat_data, n=6):
    from finetune.data.chat_template import encode_chat
    from finetune.data.files import pad_collate, read_chat_jsonl

    recs = read_chat_jsonl(chat_data["eval"])[:n]
    rows = [encode_chat(tok, r["messages"], max_length=128) for r in recs]
    return pad_collate(tok.pad_token_id)([{"input_ids": e.input_ids, "labels": e.labels} for e in rows])


def _reference(model, b):
    """The unchunked computation: full fp32 logits, cross-entropy at the scored positions."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
    logits, target = logits[:, :-1].float(), b["labels"][:, 1:]
    m = target != -100
    nll = F.cross_entropy(logits[m], target[m], reduction="sum").double()
    return nll, (logits[m].argmax(-1) == target[m]).sum()


@pytest.mark.parametrize("chunk_bytes", [1, 4096, 1 << 28])
def test_chunked_scoring_equals_full_logits(tiny_model, chat_data, chunk_bytes):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.eval.evaluation import scored_token_sums

    tok = AutoTokenizer.from_pretrained(tiny_model)
    b = _batch(tok, chat_data)
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    # A PEFT model whose adapter changes the output: LoRA everywhere and a trained copy of lm_head.
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                          LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False,
                                     modules_to_save=["lm_head"])).eval()
    with torch.no_grad():
        peft.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    for model in (plain, peft):
        with torch.no_grad():
            nll, hits = scored_token_sums(model, b["input_ids"], b["attention_mask"], b["labels"],
                                          chunk_bytes=chunk_bytes)
        ref_nll, ref_hits = _reference(model, b)
        assert float(nll) == pytest.approx(float(ref_nll), rel=1e-5), type(model).__name__
        assert int(hits) == int(ref_hits)
    with peft.disable_adapter(), torch.no_grad():  # the base through the same PEFT object
        nll, _ = scored_token_sums(peft, b["input_ids"], b["attention_mask"], b["labels"], chunk_bytes=chunk_bytes)
    assert float(nll) == pytest.approx(float(_reference(plain, b)[0]), rel=1e-5)


def test_scoring_never_builds_batch_by_sequence_logits(tiny_model, chat_data):
    """The LM head only ever sees scored positions, a chunk at a time (forward hook on it)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.eval.evaluation import scored_token_sums

    tok = AutoTokenizer.from_pretrained(tiny_model)
    b = _batch(tok, chat_data)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    shapes = []
    model.lm_head.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    vocab = model.config.vocab_size
    chunk_positions = 8
    with torch.no_grad():
        scored_token_sums(model, b["input_ids"], b["attention_mask"], b["labels"],
                          chunk_bytes=chunk_positions * 4 * vocab)
    n_scored = int((b["labels"][:, 1:] != -100).sum())
    assert all(len(s) == 2 and s[0] <= chunk_positions for s in shapes), shapes
    assert sum(s[0] for s in shapes) == n_scored  # every scored position once, nothing else
    assert n_scored < b["input_ids"].numel() / 2  # so a full-logits pass would have been larger


# ----------------------------------------------------------------------------------------------
# precision and 4-bit storage
# ----------------------------------------------------------------------------------------------
def test_full_fine_tuning_on_gpu_keeps_fp32_master_weights(tiny_model, chat_data, tmp_path):
    from finetune.training.launch import weights_dtype as _weights_dtype

    full = _cfg(tiny_model, chat_data, tmp_path, "adapter=full")
    assert _weights_dtype(full, GPU) == "float32"  # fp32 weights, bf16 autocast
    assert _weights_dtype(full, CPU) == "auto"
    assert _weights_dtype(_cfg(tiny_model, chat_data, tmp_path, "adapter=full", "dtype=bfloat16"), GPU) == "bfloat16"
    ds = _cfg(tiny_model, chat_data, tmp_path, "adapter=full", f"deepspeed={REPO}/configs/deepspeed/zero2.json")
    assert _weights_dtype(ds, GPU) == "auto"  # DeepSpeed keeps its own fp32 master copy
    assert _weights_dtype(_cfg(tiny_model, chat_data, tmp_path, "adapter=lora"), GPU) == "auto"


def _ds(tmp_path, stage, **precision):
    p = tmp_path / f"ds_{stage}_{'_'.join(f'{k}{v}' for k, v in precision.items())}.json"
    p.write_text(json.dumps({"zero_optimization": {"stage": stage}, "train_batch_size": "auto",
                             **{k: {"enabled": v} for k, v in precision.items()}}))
    return p


def test_4bit_storage_must_match_deepspeeds_dtype(tiny_model, chat_data, tmp_path):
    from finetune.training.launch import check_quantized_storage as _check_quantized_storage

    def check(ds, *over):
        _check_quantized_storage(_cfg(tiny_model, chat_data, tmp_path, "adapter=qlora", f"deepspeed={ds}", *over), CPU)

    # bf16 storage, DeepSpeed in fp16: the packed bytes would be cast as numbers.
    with pytest.raises(ConfigError, match=r"quantization.storage_dtype: .*stored as bfloat16 but DeepSpeed .* "
                                          r"casts every floating-point parameter to float16"):
        check(_ds(tmp_path, 2, fp16=True), "quantization.storage_dtype=bfloat16")
    with pytest.raises(ConfigError, match="uint8 storage cannot be partitioned by ZeRO-3"):
        check(_ds(tmp_path, 3, bf16=True), "quantization.storage_dtype=uint8")
    check(_ds(tmp_path, 2, bf16=True), "quantization.storage_dtype=uint8")  # left alone by the cast
    check(_ds(tmp_path, 3, bf16=True), "quantization.storage_dtype=bfloat16")
    check(_ds(tmp_path, 3, bf16="auto"), "quantization.storage_dtype=bfloat16", "training.precision=bf16")
    check(_ds(tmp_path, 3))  # fp32 DeepSpeed, auto storage = the fp32 compute dtype on this CPU
    check(_ds(tmp_path, 3), "quantization.storage_dtype=bfloat16")  # fp32 DeepSpeed casts nothing
    with pytest.raises(ConfigError, match="storage_dtype"):
        check(_ds(tmp_path, 3, bf16="auto", fp16="auto"), "training.precision=fp16")


# ----------------------------------------------------------------------------------------------
# resume across setups (the launch itself: test_resume_across_setups_* below)
# ----------------------------------------------------------------------------------------------
def _saved_setup(run: Path, **setup):
    run.mkdir(parents=True, exist_ok=True)
    (run / "run.json").write_text(json.dumps({"world_size": setup["world_size"], "parallel": setup}))


def test_resume_setup_rules(tmp_path):
    from finetune.training.run_dir import check_resume_setup as _check_resume_setup

    run = tmp_path / "run"
    def setup(world, stage, accum, precision="bf16"):
        return {"world_size": world, "zero_stage": stage, "batch_size": 4, "grad_accum": accum,
                "precision": precision}

    _saved_setup(run, **setup(2, 0, 1))
    # 2 ranks x 1 accum -> 1 rank x 2 accum: the same examples per step.
    _check_resume_setup(run, setup(1, 0, 2))
    with pytest.raises(RunDirError, match=r"world size 2, .*= 8 per step; this launch has world size 1.* = 4 per "
                                          r"step.*Set training.grad_accum=2"):
        _check_resume_setup(run, setup(1, 0, 1))
    _saved_setup(run, **setup(2, 2, 1))
    with pytest.raises(RunDirError, match=r"world size 2, ZeRO-2.*this launch has world size 1, ZeRO-2.*launch 2 "
                                          r"processes again"):
        _check_resume_setup(run, setup(1, 2, 2))
    with pytest.raises(RunDirError, match="same DeepSpeed ZeRO stage"):
        _check_resume_setup(run, setup(2, 3, 1))
    with pytest.raises(RunDirError, match="training.precision=bf16"):
        _check_resume_setup(run, setup(2, 2, 1, "fp16"))
    _check_resume_setup(run, setup(2, 1, 1))  # ZeRO-1 <-> ZeRO-2: same files, same partitioning
    _check_resume_setup(run, setup(2, 2, 1))


# ----------------------------------------------------------------------------------------------
# a run leaves nothing behind in the process
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_restores_the_environment_and_leaves_the_config_alone(tiny_model, chat_data, tmp_path):
    from transformers.integrations import is_deepspeed_zero3_enabled

    from finetune.training.recipe import train

    cfg = _cfg(tiny_model, chat_data, tmp_path, "training.max_steps=2", "training.report_to=[tensorboard]",
               "max_length=128")
    before_env, before_cfg = dict(os.environ), cfg.model_dump()
    train(cfg)
    assert dict(os.environ) == before_env  # e.g. the TensorBoard directory of this run is gone
    assert cfg.model_dump() == before_cfg
    assert not is_deepspeed_zero3_enabled()
    assert (tmp_path / "run" / "tensorboard").is_dir()


# ----------------------------------------------------------------------------------------------
# adapters saved by plain PEFT (no tokenizer files)
# ----------------------------------------------------------------------------------------------
def _cli(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run([sys.executable, "-m", "finetune", *args], capture_output=True, text=True, env=env,
                         cwd=cwd, timeout=600)
    assert res.returncode == 0, f"finetune {' '.join(args)}\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res


@pytest.mark.slow
def test_a_plain_peft_adapter_evaluates_merges_and_generates(tiny_model, chat_data, tmp_path):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = tmp_path / "hub_adapter"
    torch.manual_seed(0)
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                   LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).save_pretrained(adapter)
    acfg = json.loads((adapter / "adapter_config.json").read_text())
    acfg["base_model_name_or_path"] = "some-org/some-base"  # as on the Hub: not this machine's path
    (adapter / "adapter_config.json").write_text(json.dumps(acfg))
    assert not any(p.name.startswith("tokenizer") for p in adapter.iterdir())

    res = _cli("eval", "--model", str(tiny_model), "--adapter", str(adapter), "--data", str(chat_data["eval"]),
               "--output", str(tmp_path / "eval"), "--max-examples", "4", "--max-new-tokens", "4",
               "--metrics", "exact_match")
    assert "tokenizer and chat template: base model" in res.stderr
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    base, tuned = report["models"]["base"]["intrinsic"], report["models"]["tuned"]["intrinsic"]
    assert base["tokens"] == tuned["tokens"] > 0 and base["nll_sum"] != tuned["nll_sum"]

    _cli("merge", "--model", str(tiny_model), "--adapter", str(adapter), "--output", str(tmp_path / "merged"),
         "--dtype", "float32")
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert tok.chat_template == AutoTokenizer.from_pretrained(tiny_model).chat_template
    ids = tok(["The oak desk costs $12. How much is the oak desk?"], return_tensors="pt")["input_ids"]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter).eval()
    with torch.no_grad():
        assert (merged(ids).logits - ref(ids).logits).abs().max() < 1e-4

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "How much is the oak desk?"}) + "\n")
    _cli("generate", "--model", str(tiny_model), "--adapter", str(adapter), "--input", str(prompts),
         "--output", str(tmp_path / "replies.jsonl"), "--max-new-tokens", "4", "--keep-unfinished")
    first = json.loads((tmp_path / "replies.jsonl").read_text().splitlines()[0])
    assert first["messages"][0]["content"] == "How much is the oak desk?" and first["messages"][-1]["role"] == "assistant"


# ----------------------------------------------------------------------------------------------
# QLoRA 8-bit: merge follows the base it was trained on
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_an_8bit_qlora_adapter_merges_into_the_8bit_base(tiny_model, chat_data, tmp_path):
    pytest.importorskip("bitsandbytes")
    import torch
    from transformers import AutoModelForCausalLM

    from finetune import merge_adapter
    from finetune.models.loading import load_base_model
    from finetune.training.recipe import train

    run = train(_cfg(tiny_model, chat_data, tmp_path, "adapter=qlora", "quantization.bits=8",
                     "training.max_steps=3", "training.batch_size=8", "max_length=128", "lora.r=4"))
    meta = json.loads((run / "adapter" / "finetune.json").read_text())
    assert meta["quantization"]["bits"] == 8
    merged = AutoModelForCausalLM.from_pretrained(merge_adapter(run / "adapter", tmp_path / "m", dtype="float32"))
    full = AutoModelForCausalLM.from_pretrained(tiny_model)
    nf4 = load_base_model(str(tiny_model), dtype="float32", quantize="4bit", device_map={"": "cpu"}).dequantize()
    name = "model.layers.0.mlp.down_proj.weight"
    w, w_merged, w_nf4 = (dict(m.named_parameters())[name].detach() for m in (full, merged, nf4))
    int8_side, nf4_err = (w_merged - w).abs().max().item(), (w_nf4 - w).abs().max().item()
    # The merged base carries the int8 rounding (plus a small LoRA update), far below NF4's error:
    # a merge into a 4-bit base (what an 8-bit adapter used to get) would carry the NF4 error.
    assert 0 < int8_side < 0.5 * nf4_err, (int8_side, nf4_err)
    assert not torch.equal(w_merged, w)


@pytest.mark.slow
def test_the_post_training_eval_of_a_full_fine_tune_compares_the_base_with_the_tuned_model(
        tiny_model, chat_data, tmp_path):
    """It used to score only the tuned model, and label it "base"."""
    from finetune.training.recipe import train

    run = train(_cfg(tiny_model, chat_data, tmp_path, "adapter=full", "training.max_steps=12",
                     "training.batch_size=8", "training.learning_rate=1e-3", "eval.after_train=true",
                     f"eval.data={chat_data['eval']}", "eval.max_examples=6", "eval.max_new_tokens=4",
                     "eval.metrics=[exact_match]"))
    report = json.loads((run / "eval" / "report.json").read_text())
    base, tuned = report["models"]["base"]["intrinsic"], report["models"]["tuned"]["intrinsic"]
    assert report["meta"]["base_model"] == str(tiny_model) and report["meta"]["tuned_model"] == str(run / "model")
    assert base["tokens"] == tuned["tokens"] > 0
    assert tuned["nll"] < base["nll"] - 0.5, (base["nll"], tuned["nll"])  # 12 steps at lr 1e-3 moved it
