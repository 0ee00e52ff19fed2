"""`finetune plan`: counts against real models, DeepSpeed's estimators, the verdict, and the CLI's speed.

Fast (a few seconds): the models built here have 2 layers; the 70B plan reads finetune/model_configs only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune.plan.command import load_plan_config
from finetune.plan.memory import (
    GiB,
    ModelShape,
    Setup,
    activation_bytes,
    fmt_count,
    hub_id_to_key,
    layer_activation_bytes,
    lora_trainable_params,
    make_plan,
    model_state_lines,
    param_counts,
    parse_size,
    render_plan,
    resolve_model_config,
    setup_from_config,
)

REPO = Path(__file__).resolve().parents[2]
TINY = dict(vocab_size=1000, hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=2, tie_word_embeddings=False)


def _shape(**kw) -> ModelShape:
    return ModelShape.from_config({**TINY, **kw}, "tiny")


# ----------------------------------------------------------------------------------------------
# parameter counts: the plan's arithmetic equals the real modules
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,extra", [("llama", {}), ("llama", {"tie_word_embeddings": True}),
                                        ("qwen2", {}), ("mistral", {"head_dim": 48})])
def test_param_count_equals_built_model(arch, extra):
    import transformers

    cfg_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
               "mistral": transformers.MistralConfig}[arch]
    model_cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
                 "mistral": transformers.MistralForCausalLM}[arch]
    cfg = cfg_cls(**{**TINY, **extra})
    model = model_cls(cfg)
    real = sum(p.numel() for p in model.parameters())  # tied weights are one Parameter, counted once
    shape = ModelShape.from_config(cfg.to_dict(), arch)
    assert param_counts(shape)["total"] == real


@pytest.mark.parametrize("targets,to_save", [("all-linear", []), (["q_proj", "v_proj"], []),
                                             (["q_proj", "k_proj", "v_proj", "o_proj"], ["lm_head"])])
def test_lora_trainable_equals_peft(targets, to_save):
    import transformers
    from peft import LoraConfig, get_peft_model

    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY))
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=targets, modules_to_save=to_save or None,
                                                  task_type="CAUSAL_LM"))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert lora_trainable_params(_shape(), 8, targets, to_save) == trainable


PUBLISHED = {  # parameter counts on the models' hub pages / safetensors metadata
    "llama-3.1-8b": 8_030_261_248, "llama-3.1-70b": 70_553_706_496, "llama-3.2-1b": 1_235_814_400,
    "mistral-7b-v0.3": 7_248_023_552,
    "qwen2.5-7b": 7_615_616_512, "qwen2.5-14b": 14_770_033_664, "qwen2.5-32b": 32_763_876_352,
    "qwen2.5-72b": 72_706_203_648,
}


def test_bundled_model_configs_match_published_sizes():
    files = sorted((REPO / "finetune" / "model_configs").glob("*.json"))
    assert {f.stem for f in files} == set(PUBLISHED)
    for f in files:
        shape = ModelShape.from_config(json.loads(f.read_text()), str(f))
        assert param_counts(shape)["total"] == PUBLISHED[f.stem], f.stem


def test_hub_ids_resolve_to_bundled_configs(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_id_to_key("meta-llama/Llama-3.1-70B-Instruct") == "llama-3.1-70b"
    assert hub_id_to_key("meta-llama/Meta-Llama-3.1-8B-Instruct") == "llama-3.1-8b"
    assert hub_id_to_key("mistralai/Mistral-7B-Instruct-v0.3") == "mistral-7b-v0.3"
    assert hub_id_to_key("Qwen/Qwen2.5-72B-Instruct") == "qwen2.5-72b"
    raw, src = resolve_model_config("meta-llama/Llama-3.1-70B-Instruct")
    assert src.endswith("llama-3.1-70b.json") and raw["num_hidden_layers"] == 80
    with pytest.raises(FileNotFoundError, match="offline"):
        resolve_model_config("someone/unknown-model-7B")


def test_bundled_model_configs_resolve_through_the_package(monkeypatch, tmp_path):
    import importlib.resources

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # nothing of the repository in the current directory
    bundled = importlib.resources.files("finetune") / "model_configs"
    assert {q.name.removesuffix(".json") for q in bundled.iterdir() if q.name.endswith(".json")} == set(PUBLISHED)
    raw, src = resolve_model_config("mistralai/Mistral-7B-Instruct-v0.3")
    assert Path(src) == Path(str(bundled.joinpath("mistral-7b-v0.3.json"))) and raw["model_type"] == "mistral"


@pytest.mark.slow
def test_a_wheel_install_plans_a_hub_id_offline(tmp_path):
    """The bundled configs are package data: a wheel holds them, and the plan finds them there."""
    import shutil
    import zipfile

    src = tmp_path / "src"
    for part in ("finetune", "data_prep", "kitcore"):
        shutil.copytree(REPO / part, src / part, ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / f, src / f)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("from finetune.plan.memory import resolve_model_config; "
            "raw, src = resolve_model_config('meta-llama/Llama-3.1-70B-Instruct'); print(src)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert Path(proc.stdout.strip()) == site / "finetune" / "model_configs" / "llama-3.1-70b.json"


def test_every_train_config_plans_without_its_data_files():
    import yaml

    from finetune.config import ConfigError, load_config

    paths = sorted((REPO / "configs" / "train").glob("*.yaml"))
    assert paths
    for path in paths:
        recipe = yaml.safe_load(path.read_text())
        # the data files the config names are not here, so `finetune train` refuses it ...
        with pytest.raises(ConfigError) as exc:
            load_config(path)
        assert ("data.train", f"file not found: {recipe['data']['train']}") in exc.value.problems, path
        # ... while the plan is made, for the model and the run that the config describes
        cfg = load_plan_config(path)
        raw, src = resolve_model_config(cfg.model)
        shape = ModelShape.from_config(raw, src)
        plan = make_plan(shape, setup_from_config(cfg, gpus_per_node=8), alternatives=False)
        assert plan.params["total"] == PUBLISHED[hub_id_to_key(recipe["model"])], path
        s = plan.setup
        assert (s.adapter, s.lora_r, s.micro_batch, s.seq_len, s.gradient_checkpointing) == (
            recipe["adapter"], recipe["lora"]["r"], recipe["training"]["batch_size"], recipe["max_length"],
            recipe["training"]["gradient_checkpointing"]), path
        ds = recipe.get("deepspeed")
        # a path in the recipe is relative to the recipe's own file
        assert s.zero_stage == (json.loads((path.parent / ds).read_text())["zero_optimization"]["stage"] if ds else 0)
        expected = (plan.params["total"] if s.adapter == "full" else
                    lora_trainable_params(shape, recipe["lora"]["r"], recipe["lora"]["target_modules"],
                                          recipe["lora"].get("modules_to_save", [])))
        assert plan.trainable == expected, path


# ----------------------------------------------------------------------------------------------
# activations: the per-layer formula equals what autograd saves in a real LlamaDecoderLayer
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("adapter,dropout", [("full", 0.0), ("lora", 0.05), ("lora", 0.0)])
def test_layer_activations_equal_saved_tensors(adapter, dropout):
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, attn_implementation="sdpa"))
    model.config.use_cache = False
    if adapter == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", lora_dropout=dropout,
                                                 task_type="CAUSAL_LM"))
    model.train()
    params = {p.data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}
    current = {"layer": None}

    def pack(t):
        st = t.untyped_storage()
        if current["layer"] == 1 and st.data_ptr() not in params:
            saved[st.data_ptr()] = st.nbytes()
        return t

    layer = model.get_decoder().layers[1]  # layer 0's input needs no grad under LoRA: skip it
    layer.register_forward_pre_hook(lambda *a: current.update(layer=1))
    layer.register_forward_hook(lambda *a: current.update(layer=None))
    b, s = 2, 64
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=torch.randint(0, 1000, (b, s)), labels=torch.randint(0, 1000, (b, s)))
    setup = Setup(adapter=adapter, lora_r=8, lora_dropout=dropout, weight_dtype="float32", precision="fp32",
                  device="cpu", micro_batch=b, seq_len=s)
    predicted = layer_activation_bytes(_shape(), setup) * b * s
    assert predicted == pytest.approx(sum(saved.values()), rel=0.01)


def test_checkpointing_and_sequence_length_scale_activations():
    s = Setup(adapter="lora", seq_len=1024, micro_batch=1)
    shape = _shape()
    a1, a2 = activation_bytes(shape, s), activation_bytes(shape, dataclasses.replace(s, seq_len=2048))
    assert a2["layers"] == pytest.approx(2 * a1["layers"], rel=1e-6)
    ck = activation_bytes(shape, dataclasses.replace(s, gradient_checkpointing=True))
    assert ck["layers"] < a1["layers"]


# ----------------------------------------------------------------------------------------------
# DeepSpeed's own estimators (full fine-tuning, 16-bit mixed precision)
# ----------------------------------------------------------------------------------------------
def _states(plan_lines) -> tuple[float, float]:
    keep = ("weights", "trainable", "grads", "optimizer", "zero-3 gathered")
    dev = sum(x.device for x in plan_lines if x.name.startswith(keep))
    host = sum(x.host for x in plan_lines if x.name.startswith(keep))
    return dev, host


@pytest.mark.parametrize("nodes,gpn", [(1, 1), (1, 4), (1, 8), (2, 8)])
def test_full_finetune_model_states_match_deepspeed(nodes, gpn, capsys):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import (
        estimate_zero2_model_states_mem_needs,
        estimate_zero2_model_states_mem_needs_all_cold,
    )

    raw, src = resolve_model_config(str(REPO / "finetune" / "model_configs" / "llama-3.1-8b.json"))
    shape = ModelShape.from_config(raw, src)
    P = param_counts(shape)
    base = Setup(adapter="full", precision="bf16", nodes=nodes, gpus_per_node=gpn)
    for offload in (False, True):
        dev, host = _states(model_state_lines(shape, dataclasses.replace(base, zero_stage=2,
                                                                          offload_optimizer=offload))[0])
        ds_cpu, ds_gpu = estimate_zero2_model_states_mem_needs(P["total"], gpn, nodes, cpu_offload=offload)
        assert dev == pytest.approx(ds_gpu, rel=1e-6)
        if offload and nodes == 1 and 4 * gpn <= 16:  # DeepSpeed's stage-2 host formula: max(4*gpus, 16)
            assert host * gpn * 1.5 == pytest.approx(ds_cpu, rel=1e-6)
    for offload_opt, offload_par in ((False, False), (True, False), (True, True)):
        s = dataclasses.replace(base, zero_stage=3, offload_optimizer=offload_opt, offload_param=offload_par)
        dev, host = _states(model_state_lines(shape, s)[0])
        ds_cpu, ds_gpu, _ = estimate_zero3_model_states_mem_needs(
            P["total"], P["largest_module"], gpn, nodes, cpu_offload=offload_opt,
            cpu_offload_params=offload_par, zero_init=True)
        assert dev == pytest.approx(ds_gpu, rel=1e-6)
        if offload_opt:  # per node, with DeepSpeed's 1.5 buffer factor
            assert host * gpn * 1.5 == pytest.approx(ds_cpu, rel=1e-6)
    # the printed table agrees too (the function the docs name)
    estimate_zero2_model_states_mem_needs_all_cold(P["total"], gpn, nodes)
    dev, _ = _states(model_state_lines(shape, dataclasses.replace(base, zero_stage=2))[0])
    assert f"{dev / 2**30:6.2f}GB | offload_optimizer=none" in capsys.readouterr().out


def test_lora_model_states_are_far_below_deepspeeds_full_model_estimate():
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    raw, src = resolve_model_config(str(REPO / "finetune" / "model_configs" / "llama-3.1-8b.json"))
    shape = ModelShape.from_config(raw, src)
    dev, _ = _states(model_state_lines(shape, Setup(adapter="lora", zero_stage=2, gpus_per_node=8))[0])
    _, ds_gpu = estimate_zero2_model_states_mem_needs(param_counts(shape)["total"], 8, 1, cpu_offload=False)
    # DeepSpeed assumes every parameter trains (18 B each / N); LoRA trains 0.5% of them
    assert dev < 0.6 * ds_gpu


# ----------------------------------------------------------------------------------------------
# verdict, largest micro-batch, alternatives
# ----------------------------------------------------------------------------------------------
def _seventy_b(**kw) -> tuple[ModelShape, Setup]:
    raw, src = resolve_model_config(str(REPO / "finetune" / "model_configs" / "llama-3.1-70b.json"))
    s = Setup(adapter="qlora", zero_stage=3, gpus_per_node=8, seq_len=4096, micro_batch=1,
              gradient_checkpointing=True, device_memory=80 * GiB)
    return ModelShape.from_config(raw, src), dataclasses.replace(s, **kw)


def test_nf4_bytes_per_param():
    from finetune.plan.memory import nf4_bytes_per_param

    assert nf4_bytes_per_param(False) * 8 == pytest.approx(4.5)
    assert nf4_bytes_per_param(True) * 8 == pytest.approx(4.127, abs=1e-3)


def test_70b_qlora_zero3_fits_and_max_micro_batch_is_the_boundary():
    shape, s = _seventy_b()
    plan = make_plan(shape, s)
    assert plan.fits
    mb = plan.max_micro_batch
    assert mb >= 1
    assert make_plan(shape, dataclasses.replace(s, micro_batch=mb), alternatives=False).fits
    assert not make_plan(shape, dataclasses.replace(s, micro_batch=mb + 1), alternatives=False).fits


def test_70b_lora_on_one_gpu_does_not_fit_and_offers_ways_out():
    shape, s = _seventy_b(adapter="lora", zero_stage=0, gpus_per_node=1)
    plan = make_plan(shape, s)
    assert not plan.fits and plan.max_micro_batch == 0
    changes = [a["change"] for a in plan.alternatives]
    assert any("offload" in c for c in changes)
    for a in plan.alternatives:
        assert a["device_total"] <= s.device_memory and a["cost"]


def test_lora_to_qlora_and_zero3_are_offered_when_they_fit():
    raw, src = resolve_model_config(str(REPO / "finetune" / "model_configs" / "mistral-7b-v0.3.json"))
    shape = ModelShape.from_config(raw, src)
    s = Setup(adapter="lora", lora_r=32, zero_stage=2, gpus_per_node=8, micro_batch=4, seq_len=4096,
              gradient_checkpointing=True, device_memory=24 * GiB)
    plan = make_plan(shape, s)
    assert not plan.fits
    changes = " | ".join(a["change"] for a in plan.alternatives)
    assert "QLoRA" in changes and "ZeRO-3" in changes


def test_parse_size():
    assert parse_size("80GiB") == 80 * 2**30
    assert parse_size("24GB") == 24_000_000_000
    with pytest.raises(ValueError):
        parse_size("lots")


@pytest.mark.parametrize("n,text", [(999, "999"), (950_000, "950K"), (12_345, "12.3K"), (999_960, "1.00M"),
                                    (2_500_000, "2.50M"), (124_700_000, "124.7M"), (8_030_261_248, "8.03B"),
                                    (70_553_706_496, "70.55B")])
def test_fmt_count(n, text):
    assert fmt_count(n) == text


def test_plan_of_a_model_under_5m_params_prints_its_size():
    plan = make_plan(_shape(), Setup(adapter="lora", lora_r=8))
    assert plan.params["total"] == 1_922_304 and plan.trainable == 72_704
    out = render_plan(plan)
    assert "(1.92M params, 2 layers" in out and "trainable 72.7K params" in out
    assert "1.92M params x 2 B" in out and "72.7K x 4 B" in out
    assert "0.00B" not in out and "0.0M" not in out


# ----------------------------------------------------------------------------------------------
# the command: fast, offline, no torch
# ----------------------------------------------------------------------------------------------
def test_cli_70b_plan_under_two_seconds_offline_without_torch():
    code = ("import sys; from finetune.plan.command import main; rc = main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'torch imported'; raise SystemExit(rc)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code, "configs/train/llama3_70b_qlora_zero3.yaml",
                           "--gpus-per-node", "8", "--gpu-memory", "80GiB"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    assert "verdict   FITS" in proc.stdout and "activations: decoder layers" in proc.stdout
    assert elapsed < 2.0, f"took {elapsed:.2f}s"


def test_cli_exit_code_and_json_when_it_does_not_fit():
    proc = subprocess.run([sys.executable, "-m", "finetune.plan", "configs/train/llama3_70b_qlora_zero3.yaml",
                           "adapter=lora", "deepspeed=null", "--gpu-memory", "80GiB", "--json"],
                          cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 1, proc.stderr
    out = json.loads(proc.stdout)
    assert out["fits"] is False and out["alternatives"]
