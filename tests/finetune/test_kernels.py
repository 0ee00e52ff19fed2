"""training.kernels: what it means on each device, for each model and loss, and what `finetune plan`
says it saves. Liger's kernels themselves need CUDA (tests/gpu/test_gpu.py runs them)."""

from __future__ import annotations

import sys
import types
from dataclasses import replace

import pytest

from finetune.config import ConfigError, load_config
from finetune.plan.memory import ModelShape, Setup, activation_bytes, layer_activation_bytes
from finetune.training.launch import kernel_settings
from kitcore.runtime import Runtime

CPU = Runtime(rank=0, local_rank=0, world_size=1, local_world_size=1, device="cpu", backend=None)
GPU = Runtime(rank=0, local_rank=0, world_size=1, local_world_size=1, device="cuda:0", backend=None)


def _cfg(chat_data, tiny_model, *extra):
    return load_config(None, [f"model={tiny_model}", f"data.train={chat_data['train']}", "output_dir=unused", *extra])


@pytest.fixture
def fake_liger(monkeypatch):
    """liger_kernel's model table, as installed on a GPU machine (its kernels are Triton: not here)."""
    mp = types.ModuleType("liger_kernel.transformers.monkey_patch")
    mp.MODEL_TYPE_TO_APPLY_LIGER_FN = {"llama": None, "mistral": None, "qwen2": None}
    for name in ("liger_kernel", "liger_kernel.transformers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", mp)


def test_unknown_kernels_value_names_the_key(chat_data, tiny_model):
    with pytest.raises(ConfigError) as e:
        _cfg(chat_data, tiny_model, "training.kernels=triton")
    assert "training.kernels" in str(e.value)


def test_liger_is_off_on_cpu_with_a_warning(chat_data, tiny_model, caplog):
    k = kernel_settings(_cfg(chat_data, tiny_model, "training.kernels=liger"), CPU, "llama")
    assert k.liger is None and not k.fused_loss
    assert "need a CUDA GPU" in caplog.text


def test_liger_missing_on_a_gpu_is_a_config_error(chat_data, tiny_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # import fails as when it is not installed
    with pytest.raises(ConfigError) as e:
        kernel_settings(_cfg(chat_data, tiny_model, "training.kernels=liger"), GPU, "llama")
    assert "training.kernels" in str(e.value) and "finetune-kit[liger]" in str(e.value)


def test_liger_on_a_gpu_fuses_the_loss_except_under_zero3(chat_data, tiny_model, fake_liger, tmp_path):
    k = kernel_settings(_cfg(chat_data, tiny_model, "training.kernels=liger"), GPU, "llama")
    assert k.liger == {"rope": True, "rms_norm": True, "swiglu": True, "fused_linear_cross_entropy": True,
                       "cross_entropy": False}
    assert k.fused_loss
    full = kernel_settings(_cfg(chat_data, tiny_model, "training.kernels=liger", "training.loss=full"), GPU, "llama")
    assert full.liger["cross_entropy"] and not full.fused_loss
    ds = tmp_path / "z3.json"
    ds.write_text('{"zero_optimization": {"stage": 3}}')
    z3 = kernel_settings(_cfg(chat_data, tiny_model, "training.kernels=liger", f"deepspeed={ds}"), GPU, "llama")
    assert z3.liger["rms_norm"] and not z3.fused_loss and "ZeRO-3" in z3.notes[0]


def test_kernels_auto_is_liger_on_a_gpu_that_has_it_for_the_family_and_none_elsewhere(chat_data, tiny_model,
                                                                                       fake_liger, monkeypatch):
    """The default: Liger on CUDA when it is installed and covers the model's family; otherwise none,
    said in the run summary (notes), never an error; on CPU none without a word."""
    cfg = _cfg(chat_data, tiny_model)
    assert cfg.training.kernels == "auto"
    k = kernel_settings(cfg, GPU, "llama")
    assert k.liger["rms_norm"] and k.fused_loss and k.notes[0] == "kernels auto: liger (model type llama)"
    other = kernel_settings(cfg, GPU, "gpt2")
    assert other.liger is None and "no kernels for model type 'gpt2'" in other.notes[0]
    assert kernel_settings(cfg, CPU, "llama").liger is None and not kernel_settings(cfg, CPU, "llama").notes
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", None)  # not installed
    missing = kernel_settings(cfg, GPU, "llama")
    assert missing.liger is None and "not installed" in missing.notes[0]


def test_the_plan_counts_liger_for_auto_only_where_a_run_would_use_it(chat_data, tiny_model, monkeypatch):
    import importlib.util

    from finetune.plan.memory import setup_from_config

    cfg = _cfg(chat_data, tiny_model)
    assert setup_from_config(cfg, device="cpu").kernels == "none"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "liger_kernel" else real(name, *a))
    assert setup_from_config(cfg, device="gpu").kernels == "none"  # not installed here: the larger plan
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "liger_kernel" else real(name, *a))
    assert setup_from_config(cfg, device="gpu").kernels == "liger"  # the tiny model is a llama


def test_liger_for_an_unsupported_model_lists_the_supported_ones(chat_data, tiny_model, fake_liger):
    with pytest.raises(ConfigError) as e:
        kernel_settings(_cfg(chat_data, tiny_model, "training.kernels=liger"), GPU, "gpt2")
    assert "'gpt2'" in str(e.value) and "llama, mistral, qwen2" in str(e.value)


def test_the_trainer_gets_liger_and_the_kit_does_not_install_a_second_loss(chat_data, tiny_model, fake_liger,
                                                                           tmp_path):
    from finetune.models import losses
    from finetune.models.loading import load_tokenizer
    from finetune.training.arguments import training_arguments
    from finetune.training.launch import Kernels, resolve_launch
    from finetune.training.recipe import _setup_model

    cfg = _cfg(chat_data, tiny_model, "training.kernels=liger")
    k = kernel_settings(cfg, GPU, "llama")
    on_cpu = resolve_launch(cfg, CPU)  # what a CPU launch decides, with the kernels a GPU launch decided
    args = training_arguments(cfg, tmp_path / "run", False, replace(on_cpu, kernels=k))
    assert args.use_liger_kernel and args.liger_kernel_config == k.liger
    tok = load_tokenizer(cfg.model)
    assert not losses.installed(_setup_model(cfg, tok, replace(on_cpu, kernels=k)))
    assert losses.installed(_setup_model(cfg, tok, replace(on_cpu, kernels=Kernels())))


LLAMA_8B = ModelShape(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False)


def test_plan_counts_what_liger_saves_per_layer_and_in_the_head():
    none = Setup(adapter="lora", micro_batch=4, seq_len=4096, device="gpu", precision="bf16",
                 weight_dtype="bfloat16", lora_dropout=0.0)
    liger = replace(none, kernels="liger")
    h, i, A = 4096, 14336, 2
    # RMSNorm x2: fp32 input (4h) -> its own dtype (A*h); SwiGLU: 3 saved tensors of width i -> 2.
    saved = 2 * (4 * h - A * h) + A * i
    assert layer_activation_bytes(LLAMA_8B, none) - layer_activation_bytes(LLAMA_8B, liger) == pytest.approx(saved)
    tokens = 4 * 4096
    chunk = 1 << (tokens // -(-128256 // h) - 1).bit_length()  # next power of 2 of tokens / ceil(V / H)
    head = (2 * A * h + 8) * tokens + A * 128256 * chunk
    assert activation_bytes(LLAMA_8B, liger)["head"] == pytest.approx(head)
    assert activation_bytes(LLAMA_8B, liger)["head"] < activation_bytes(LLAMA_8B, none)["head"]
    # Under ZeRO-3 Liger's loss is off (the kit's chunked loss stays): the head is as without kernels.
    z3n, z3l = (replace(s, zero_stage=3) for s in (none, liger))
    assert activation_bytes(LLAMA_8B, z3l)["head"] == activation_bytes(LLAMA_8B, z3n)["head"]
    # On CPU the kernels do not run, so they save nothing.
    cpu = replace(liger, device="cpu")
    assert layer_activation_bytes(LLAMA_8B, cpu) == layer_activation_bytes(LLAMA_8B, replace(cpu, kernels="none"))


def test_a_liger_run_leaves_the_model_familys_module_as_it_found_it(chat_data, tiny_model):
    """Liger rebinds names in transformers' modeling module process-wide; a later model of that family
    in the same process (an evaluation on CPU) ran its Triton kernels on CPU tensors and failed. The
    run restores every rebound name on the way out, also when training raises."""
    from transformers.models.llama import modeling_llama

    from finetune.training.recipe import _modeling_module, scoped_module_globals

    cfg = _cfg(chat_data, tiny_model)
    assert _modeling_module(cfg) == "transformers.models.llama.modeling_llama"
    norm, rope = modeling_llama.LlamaRMSNorm, modeling_llama.apply_rotary_pos_emb
    with pytest.raises(RuntimeError), scoped_module_globals(_modeling_module(cfg)):
        modeling_llama.LlamaRMSNorm = type("LigerRMSNorm", (), {})
        modeling_llama.apply_rotary_pos_emb = lambda *a: None
        raise RuntimeError("training failed")
    assert modeling_llama.LlamaRMSNorm is norm and modeling_llama.apply_rotary_pos_emb is rope
    with scoped_module_globals(None):  # kernels=none: nothing is touched
        pass
