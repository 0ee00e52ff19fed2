"""Checks that need CUDA: skipped on a machine without a GPU (all of CI here). On a GPU machine:

    pytest -m gpu tests/gpu

Each test is small (the tiny local model; a few minutes on one GPU in all). Tests that need two
GPUs say so and skip with one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")

REPO = Path(__file__).resolve().parents[2]
ACCELERATE = Path(sys.executable).with_name("accelerate")


def _env(**extra):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    return env


def _run(cmd, **env):
    res = subprocess.run(cmd, cwd=REPO, env=_env(**env), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))}\n{res.stdout[-4000:]}\n{res.stderr[-6000:]}"
    return res


def _overrides(tiny_model, chat_data, out, *extra):
    return [f"model={tiny_model}", f"data.train={chat_data['train']}", f"output_dir={out}", "max_length=128",
            "training.max_steps=6", "training.batch_size=4", "training.report_to=[none]", "lora.r=8", *extra]


def _config(tmp_path, tiny_model, chat_data, *extra) -> tuple[Path, Path]:
    import yaml

    from finetune.config import parse_overrides

    run = tmp_path / "run"
    cfg = parse_overrides(_overrides(tiny_model, chat_data, run, *extra))
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, run


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory, tiny_model, chat_data):
    """One LoRA run on the GPU through the CLI, without a launcher (CUDA_VISIBLE_DEVICES unset)."""
    out = tmp_path_factory.mktemp("gpu") / "run"
    env = _env()
    env.pop("CUDA_VISIBLE_DEVICES", None)
    res = subprocess.run([sys.executable, "-m", "finetune", "train", *_overrides(tiny_model, chat_data, out)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-6000:]
    return out, res


def test_the_device_decision_picks_this_ranks_gpu():
    from kitcore.runtime import current, decide_device

    assert current().device == "cuda:0"
    n = torch.cuda.device_count()
    assert decide_device(n - 1, cuda_devices=n) == f"cuda:{n - 1}"


def test_a_single_training_process_uses_one_gpu_whatever_the_node_has(gpu_run):
    """No nn.DataParallel, no batch multiplied by the GPU count (8-GPU nodes did both)."""
    _, res = gpu_run
    assert "device cuda:0" in res.stdout, res.stdout[-3000:]
    assert "effective batch  4 = 4 per device x 1 accum x 1 ranks" in res.stdout, res.stdout[-3000:]


def test_the_gpu_run_logs_its_allocator_peak_beside_the_plan_from_its_data(gpu_run):
    """MemoryCheck's CUDA branch: the caching allocator's peak (reserved, and allocated beside it) against
    the plan from the run's data (finetune/plan/batches.py)."""
    out, res = gpu_run
    assert "batch     longest:" in res.stdout and "without data (every row 128 tokens)" in res.stdout, res.stdout[-3000:]
    mem = json.loads((out / "run.json").read_text())["memory"]
    assert mem["device"] == "gpu" and mem["measured"] == "torch.cuda.max_memory_reserved", mem
    assert 0 < mem["measured_allocated_bytes"] <= mem["memory_measured_bytes"], mem
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "memory_plan_bytes" in x]
    assert recs and recs[0]["memory_measured_bytes"] == mem["memory_measured_bytes"]


def test_packing_auto_packs_with_flex_attention_on_the_gpu_and_the_run_measures_its_mfu(gpu_run):
    """The default (`packing: auto`) on CUDA: padding-free rows through flex_attention's document mask,
    said in the summary and recorded in config.yaml; every log line has its throughput and MFU against
    the GPU's peak."""
    import importlib.util

    import yaml

    out, res = gpu_run
    assert "attention        flex_attention; packing on" in res.stdout, res.stdout[-3000:]
    if importlib.util.find_spec("liger_kernel"):  # training.kernels: auto, on a GPU that has Liger
        assert "kernels          liger; kernels auto: liger (model type llama)" in res.stdout, res.stdout[-3000:]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["packing"] is True and saved["attn_implementation"] == "flex_attention"
    logs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert logs and all(m["tokens_per_s"] > 0 and 0 < m["mfu"] < 1 and m["peak_mem_gib"] > 0 for m in logs), logs
    through = json.loads((out / "run.json").read_text())["throughput"]
    assert through["mfu_peak"].startswith(torch.cuda.get_device_name(0)), through


@pytest.mark.parametrize("kernel", ["flex_attention", "hub"])
def test_packed_flex_attention_equals_the_padded_batch_in_bf16(tiny_model, chat_data, tmp_path, kernel):
    """The packed row through flex_attention (and through the Hub flash-attention kernel that `packing:
    auto` would take from the local cache, when one is cached) gives the padded batch's loss and LoRA
    gradients (sdpa), within bf16 tolerance."""
    from peft import LoraConfig, get_peft_model

    from finetune.training.launch import cached_attention_kernel

    if kernel == "hub":
        kernel = cached_attention_kernel("cuda:0")
        if kernel is None:
            pytest.skip("no Hub flash-attention kernel built for this torch/CUDA in the local cache")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.config import load_config
    from finetune.data.chat_template import encode_chat
    from finetune.data.files import pad_collate
    from finetune.training.recipe import make_collator

    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = [json.loads(x)["messages"] for x in chat_data["train"].read_text().splitlines()[:8]]
    feats = [{"input_ids": e.input_ids, "labels": e.labels} for e in (encode_chat(tok, m) for m in rows)]
    cfg = load_config(None, [f"model={tiny_model}", f"data.train={chat_data['train']}", f"output_dir={tmp_path / 'r'}",
                             "packing=true", f"attn_implementation={kernel}"])
    packed = {k: v.cuda() for k, v in make_collator(cfg, tok)(feats).items()}
    padded = {k: v.cuda() for k, v in pad_collate(tok.pad_token_id)(feats).items()}
    losses, grads = [], []
    for attn, batch in ((kernel, packed), ("sdpa", padded)):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16, attn_implementation=attn).cuda()
        model.config.use_cache = False
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM"))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.manual_seed(hash(name) % 1000)
                torch.nn.init.normal_(p, std=0.02)
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None]))
    assert losses[0] == pytest.approx(losses[1], rel=2e-2), losses
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0).item()
    assert cos > 0.99, cos


def test_training_compile_on_the_gpu_gives_the_eager_losses(tiny_model, chat_data, tmp_path):
    """training.compile (regional: each decoder layer) with the GPU defaults (packed flex_attention rows,
    bf16): the first steps' losses equal the eager run's within bf16 tolerance."""
    losses = {}
    for compiled in ("false", "true"):
        out = tmp_path / f"compile-{compiled}"
        _run([sys.executable, "-m", "finetune", "train", *_overrides(
            tiny_model, chat_data, out, "training.max_steps=3", "training.logging_steps=1", f"training.compile={compiled}")])
        losses[compiled] = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert losses["true"] == pytest.approx(losses["false"], rel=2e-2), losses


def test_token_budget_batches_and_the_auto_budget_on_the_gpu(tiny_model, chat_data, tmp_path):
    """tokens_per_batch: auto against the GPU's memory: the whole step fits one micro-batch on this tiny model."""
    out = tmp_path / "run"
    res = _run([sys.executable, "-m", "finetune", "train", *_overrides(
        tiny_model, chat_data, out, "training.tokens_per_batch=auto", "training.tokens_per_step=1024")])
    assert "tokens_per_batch auto: 1024" in res.stdout and "x grad_accum 1 x 1 rank(s)" in res.stdout, res.stdout[-3000:]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_eval_inference_and_the_sweep_objective_run_on_the_gpu(gpu_run, chat_data, tmp_path):
    from finetune import chat, evaluate, load_for_inference
    from finetune.sweep import assign_worker_gpus

    run, _ = gpu_run
    model, tok = load_for_inference(run / "adapter")
    assert next(model.parameters()).device.type == "cuda"
    assert isinstance(chat(model, tok, [{"role": "user", "content": "How much is the red lamp?"}],
                           max_new_tokens=4), str)
    report = evaluate(data=chat_data["eval"], output=tmp_path / "eval", adapter=run / "adapter", max_examples=4,
                      max_new_tokens=4, metrics=["exact_match"])
    assert report["meta"]["device"].startswith("cuda"), report["meta"]
    n = torch.cuda.device_count()
    assert assign_worker_gpus(n) == [str(i) for i in range(n)]  # one GPU per sweep worker


def test_merge_needs_no_gpu_and_matches_base_plus_adapter(gpu_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from finetune import load_for_inference, merge_adapter

    run, _ = gpu_run
    merged = AutoModelForCausalLM.from_pretrained(merge_adapter(run / "adapter", tmp_path / "m", dtype="float32"))
    assert next(merged.parameters()).device.type == "cpu"
    model, tok = load_for_inference(run / "adapter", device="cpu", dtype="float32")
    ids = tok(["The oak desk costs $12."], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert (merged(ids).logits - model(ids).logits).abs().max() < 1e-4


def test_qlora_trains_on_the_gpu_and_is_evaluated_in_4bit(tiny_model, chat_data, tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "run"
    _run([sys.executable, "-m", "finetune", "train", *_overrides(tiny_model, chat_data, out, "adapter=qlora",
          "eval.after_train=true", f"eval.data={chat_data['eval']}", "eval.max_examples=4", "eval.max_new_tokens=4",
          "eval.metrics=[exact_match]")])
    meta = json.loads((out / "eval" / "report.json").read_text())["meta"]
    assert meta["quantize"] == "4bit" and meta["device"].startswith("cuda"), meta


def test_full_fine_tuning_keeps_fp32_master_weights_under_bf16_autocast(tiny_model, chat_data, tmp_path):
    if not torch.cuda.is_bf16_supported():
        pytest.skip("needs a bf16 GPU")
    from transformers import TrainerCallback

    from finetune.config import load_config
    from finetune.training.recipe import train

    seen = {}

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            seen["dtype"] = next(model.parameters()).dtype
            seen["bf16"] = args.bf16

    train(load_config(None, _overrides(tiny_model, chat_data, tmp_path / "run", "adapter=full")), callbacks=[Probe()])
    assert seen == {"dtype": torch.float32, "bf16": True}


def test_chunked_scoring_on_the_gpu_equals_full_logits(tiny_model, chat_data):
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.data.chat_template import encode_chat
    from finetune.data.files import pad_collate, read_chat_jsonl
    from finetune.eval.evaluation import scored_token_sums

    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = [encode_chat(tok, r["messages"], max_length=128) for r in read_chat_jsonl(chat_data["eval"])[:6]]
    b = {k: v.cuda() for k, v in pad_collate(tok.pad_token_id)(
        [{"input_ids": e.input_ids, "labels": e.labels} for e in rows]).items()}
    model = AutoModelForCausalLM.from_pretrained(tiny_model).cuda().eval()
    with torch.no_grad():
        nll, _ = scored_token_sums(model, b["input_ids"], b["attention_mask"], b["labels"], chunk_bytes=4096)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
    t = b["labels"][:, 1:]
    ref = F.cross_entropy(logits[t != -100], t[t != -100], reduction="sum")
    assert nll.device.type == "cuda" and float(nll) == pytest.approx(float(ref), rel=1e-5)


# ----------------------------------------------------------------------------------------------
# preference tuning: DPO, ORPO, SimPO, KTO
# ----------------------------------------------------------------------------------------------
PREFERENCE_SETTINGS = {
    "dpo": [],
    "orpo": ["orpo.beta=0.25"],
    "simpo": ["simpo.beta=2.5", "simpo.gamma=1.5", "simpo.sft_weight=0.3"],
    "kto": [],
}


def _expected_first_step(method: str, hand) -> dict[str, float]:
    """The first step's logged figures from per-pair (sum, count) completion log-probs of the base
    (the formulas tests/finetune/test_preference.py checks on CPU)."""
    import math

    logsig = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
    log1mexp = lambda x: math.log(-math.expm1(x))  # noqa: E731
    avg = [(c / nc, r / nr) for (c, nc), (r, nr) in hand]
    nll = -sum(c for (c, _), _ in hand) / sum(n for (_, n), _ in hand)
    if method == "dpo":  # policy = reference at step 1
        return {"loss": math.log(2), "logps/chosen": sum(c for (c, _), _ in hand) / len(hand),
                "logps/rejected": sum(r for _, (r, _) in hand) / len(hand)}
    if method == "orpo":
        odds = [(c - r) - (log1mexp(c) - log1mexp(r)) for c, r in avg]
        ratio = sum(logsig(o) for o in odds) / len(odds)
        return {"loss": nll - 0.25 * ratio, "nll_loss": nll, "log_odds_ratio": ratio}
    if method == "simpo":
        return {"loss": sum(-logsig(2.5 * (c - r) - 1.5) for c, r in avg) / len(avg) + 0.3 * nll}
    return {"loss": 0.5, "kl": 0.0}  # KTO at zero reward


def _preference_run(tiny_model, tmp_path, rows, method, *extra) -> tuple[list[dict], dict]:
    from transformers import TrainerCallback

    from finetune.config import load_config
    from finetune.training.recipe import train
    from tests.conftest import write_jsonl

    seen = {}

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            seen.update(device=next(model.parameters()).device, bf16=args.bf16)

    run = tmp_path / f"run-{method}-{len(list(tmp_path.iterdir()))}"
    data = write_jsonl(tmp_path / f"{method}.jsonl", rows)
    # KTO reads a pair as two examples: one batch holds every example of the file either way
    batch = 2 * len(rows) if method == "kto" else len(rows)
    train(load_config(None, [f"model={tiny_model}", f"data.train={data}", f"output_dir={run}", f"method={method}",
                             *PREFERENCE_SETTINGS[method], "max_length=128", f"training.batch_size={batch}",
                             "training.logging_steps=1", "training.report_to=[none]", "lora.dropout=0", "seed=0",
                             *extra]), callbacks=[Probe()])
    logs = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    return logs, seen


def check_preference_method_on(device_type: str, method: str, tiny_model, tmp_path) -> None:
    """On `device_type`: the first step in fp32 equals the hand computation from the plain base
    model's full logits on CPU; on a bf16 GPU, eight steps on the same batch in bf16 autocast keep the
    loss finite and bring it down."""
    import math

    from tests.finetune.test_preference import _hand_completion_logps, price_pairs

    rows = price_pairs(6, 3)
    expected = _expected_first_step(method, _hand_completion_logps(tiny_model, rows))
    logs, seen = _preference_run(tiny_model, tmp_path, rows, method, "training.precision=fp32", "training.max_steps=1")
    assert seen["device"].type == device_type and not seen["bf16"], seen
    for key, value in expected.items():
        assert logs[0][key] == pytest.approx(value, rel=1e-3, abs=1e-5), (key, logs[0])
    if device_type != "cuda" or not torch.cuda.is_bf16_supported():
        return
    logs, seen = _preference_run(tiny_model, tmp_path, rows, method, "training.max_steps=8",
                                 "training.learning_rate=5e-3")
    assert seen["bf16"], seen
    losses = [r["loss"] for r in logs]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses


@pytest.mark.parametrize("method", sorted(PREFERENCE_SETTINGS))
def test_preference_losses_on_the_gpu_equal_the_hand_computation_and_fall_in_bf16(method, tiny_model, tmp_path):
    check_preference_method_on("cuda", method, tiny_model, tmp_path)


# ----------------------------------------------------------------------------------------------
# launched jobs
# ----------------------------------------------------------------------------------------------
def _launch(accel_config, nproc, *args):
    return _run([str(ACCELERATE), "launch", "--config_file", f"configs/accelerate/{accel_config}",
                 "--num_processes", str(nproc), *args])


@two_gpus
def test_ddp_qlora_with_gradient_checkpointing_on_two_gpus(tiny_model, chat_data, tmp_path):
    pytest.importorskip("bitsandbytes")
    config, run = _config(tmp_path, tiny_model, chat_data, "adapter=qlora", "training.gradient_checkpointing=true")
    res = _launch("ddp.yaml", 2, "-m", "finetune", "train", str(config))
    assert "world size       2" in res.stdout and (run / "adapter" / "adapter_model.safetensors").is_file()


def test_zero3_with_the_post_training_eval_on_gpus(tiny_model, chat_data, tmp_path):
    pytest.importorskip("deepspeed")
    nproc = min(2, torch.cuda.device_count())
    config, run = _config(tmp_path, tiny_model, chat_data, "eval.after_train=true", f"eval.data={chat_data['eval']}",
                          "eval.max_examples=4", "eval.max_new_tokens=4", "eval.metrics=[exact_match]")
    _launch("deepspeed_zero3.yaml", nproc, "-m", "finetune", "train", str(config))
    report = json.loads((run / "eval" / "report.json").read_text())
    assert report["meta"]["device"].startswith("cuda") and report["models"]["tuned"]["extrinsic"]["n"] == 4


def test_checkpoints_are_hashed_across_ranks_and_a_damaged_one_is_refused_under_zero3_on_gpus(
        tiny_model, chat_data, tmp_path):
    """The checksum collectives on NCCL: the ranks hash the checkpoint between them (all_gather_object)
    and rank 0's verdict on resume reaches every rank (broadcast_object_list)."""
    pytest.importorskip("deepspeed")
    from tests.kitcore.test_integrity import flip_middle

    nproc = min(2, torch.cuda.device_count())
    config, run = _config(tmp_path, tiny_model, chat_data, "training.save_steps=3")
    _launch("deepspeed_zero3.yaml", nproc, "-m", "finetune", "train", str(config))
    ckpt = run / "checkpoints" / "checkpoint-6"
    files = json.loads((ckpt / "checksums.json").read_text())["files"]
    shards = sorted(f for f in files if f.endswith("optim_states.pt"))
    assert len(shards) == nproc, sorted(files)  # every rank's ZeRO shard is in the manifest
    flip_middle(ckpt / shards[-1])
    res = subprocess.run([str(ACCELERATE), "launch", "--config_file", "configs/accelerate/deepspeed_zero3.yaml",
                          "--num_processes", str(nproc), "-m", "finetune", "train", str(config), "resume=true",
                          "training.max_steps=9"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and f"{shards[-1]}: content differs" in out and "checkpoint-3" in out, out[-4000:]


@two_gpus
def test_distributed_eval_reduces_on_the_gpus_under_nccl(gpu_run, chat_data, tmp_path):
    """Every rank scores a shard; the sums are all-reduced as CUDA tensors (NCCL has no CPU path)."""
    run, _ = gpu_run
    _launch("ddp.yaml", 2, "-m", "finetune", "eval", "--adapter", str(run / "adapter"), "--data",
            str(chat_data["eval"]), "--output", str(tmp_path / "eval"), "--max-new-tokens", "4", "--metrics",
            "exact_match")
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["meta"]["world_size"] == 2 and report["meta"]["device"] == "cuda:0"
    single = json.loads((run.parent / "single.json").read_text()) if (run.parent / "single.json").exists() else None
    if single is None:
        from finetune import evaluate

        single = evaluate(data=chat_data["eval"], output=tmp_path / "eval1", adapter=run / "adapter",
                          max_new_tokens=4, metrics=["exact_match"])
    a, b = report["models"]["tuned"]["intrinsic"], single["models"]["tuned"]["intrinsic"]
    assert a["tokens"] == b["tokens"] and a["nll_sum"] == pytest.approx(b["nll_sum"], rel=1e-3)


def test_liger_kernels_are_applied_and_give_the_loss_of_the_kits_chunked_loss(tiny_model, chat_data, tmp_path):
    """training.kernels=liger on one GPU: Liger's RMSNorm/SwiGLU are in the trained model, its fused
    linear cross-entropy replaces the kit's chunked loss, and the first step's loss equals the run
    without kernels (fp32 both, same seed and data)."""
    pytest.importorskip("liger_kernel")
    from transformers import TrainerCallback

    from finetune.config import load_config
    from finetune.training.recipe import train

    seen: dict = {}

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            base = model.get_base_model()
            seen["names"] = {m._get_name() for m in base.modules()}
            seen["liger"] = args.use_liger_kernel

    losses = {}
    for kernels in ("none", "liger"):
        run = tmp_path / kernels
        train(load_config(None, _overrides(tiny_model, chat_data, run, f"training.kernels={kernels}", "dtype=float32",
                                           "training.precision=fp32", "lora.dropout=0")), callbacks=[Probe()])
        first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
        losses[kernels] = first["loss"]
        if kernels == "liger":
            assert seen["liger"] and {"LigerRMSNorm", "LigerSwiGLUMLP"} <= seen["names"], seen
            info = json.loads((run / "run.json").read_text())["kernels"]
            assert info["liger"]["fused_linear_cross_entropy"] is True, info
    assert abs(losses["liger"] - losses["none"]) <= 1e-3 * abs(losses["none"]), losses
    # Liger rebinds transformers' Llama names process-wide; the run put them back (a later CPU model in
    # this process would otherwise run Triton on CPU tensors)
    from transformers.models.llama import modeling_llama

    assert modeling_llama.LlamaRMSNorm.__name__ == "LlamaRMSNorm", modeling_llama.LlamaRMSNorm
    assert modeling_llama.LlamaMLP.__name__ == "LlamaMLP", modeling_llama.LlamaMLP


# ----------------------------------------------------------------------------------------------
# distillation and sequence-level generation
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpu_student(tmp_path_factory, tiny_model) -> Path:
    from finetune.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("student") / "model", tokenizer_from=tiny_model, hidden_size=32,
                            layers=2, heads=4, kv_heads=2, max_positions=512, seed=1)


def test_the_triton_divergence_equals_the_cpu_one(tiny_model, gpu_student, chat_data):
    """TRL's kernel runs Triton on CUDA and a torch fallback on CPU (which tests/finetune/test_distill.py
    checks against a hand computation): the same loss and gradients on the same batch, in fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.config import DistillSection
    from finetune.data.chat_template import encode_chat
    from finetune.data.files import pad_collate, read_chat_jsonl
    from finetune.methods.distill_trainer import install_distill_loss
    from finetune.models.teacher import install_teacher_hidden

    tok = AutoTokenizer.from_pretrained(gpu_student)
    rows = [encode_chat(tok, r["messages"], max_length=128) for r in read_chat_jsonl(chat_data["eval"])[:6]]
    batch = pad_collate(tok.pad_token_id)([{"input_ids": e.input_ids, "labels": e.labels} for e in rows])
    results = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        teacher = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).to(device).eval()
        student = AutoModelForCausalLM.from_pretrained(gpu_student, dtype=torch.float32).to(device)
        install_teacher_hidden(teacher)
        install_distill_loss(student, teacher, DistillSection(teacher="t", divergence="jsd", jsd_beta=0.3,
                                                              temperature=2.0, alpha=0.4))
        b = {k: v.to(device) for k, v in batch.items()}
        h_t = teacher(**{k: b[k] for k in ("input_ids", "attention_mask")}, labels=b["labels"])
        out = student(**b, teacher_hidden=h_t)
        out.loss.backward()
        results[device] = (float(out.loss), student.lm_head.weight.grad.cpu(), student.model.norm.weight.grad.cpu())
    assert results["cuda"][0] == pytest.approx(results["cpu"][0], rel=1e-4), "loss on cuda vs cpu"
    for name, a, b in zip(("lm_head grad", "final norm grad"), results["cuda"][1:], results["cpu"][1:]):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-6), (
            f"{name}: cuda vs cpu differ by up to {(a - b).abs().max().item():.3g} (|cpu| max {b.abs().max().item():.3g})")


def test_distillation_with_a_4bit_teacher_trains_and_evaluates_on_the_gpu(tiny_model, gpu_student, chat_data, tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "run"
    _run([sys.executable, "-m", "finetune", "train", *_overrides(gpu_student, chat_data, out, "method=distill",
          f"distill.teacher={tiny_model}", "distill.teacher_load_in_4bit=true", "training.logging_steps=1",
          "eval.after_train=true", f"eval.data={chat_data['eval']}", "eval.max_examples=4", "eval.max_new_tokens=4",
          "eval.metrics=[exact_match]")])
    logs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if '"kd_loss"' in ln]
    assert len(logs) == 6 and all(m["kd_loss"] > 0 for m in logs), logs
    report = json.loads((out / "eval" / "report.json").read_text())
    assert report["meta"]["teacher"]["teacher_load_in_4bit"] and report["meta"]["device"].startswith("cuda")
    assert report["models"]["tuned"]["intrinsic"]["kl_to_teacher"] > 0


def test_distillation_under_zero3_on_gpus(tiny_model, gpu_student, chat_data, tmp_path):
    pytest.importorskip("deepspeed")
    nproc = min(2, torch.cuda.device_count())
    config, run = _config(tmp_path, gpu_student, chat_data, "method=distill", f"distill.teacher={tiny_model}",
                          "training.logging_steps=1")
    res = _launch("deepspeed_zero3.yaml", nproc, "-m", "finetune", "train", str(config))
    assert "ZeRO stage 3" in res.stdout and "teacher " in res.stdout, res.stdout[-3000:]
    logs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if '"kd_loss"' in ln]
    assert len(logs) == 6, logs


def test_generate_with_vllm_gives_the_transformers_answers(tmp_path):
    """vLLM on the GPU and transformers generate write the same file (greedy; vLLM computes in 16 bits,
    so a near tie may flip a token: at least 4 of 5 answers must agree exactly)."""
    pytest.importorskip("vllm")
    from finetune.inference.generate import generate_file
    from finetune.tiny import build_random_adapter, build_tiny_model
    from tests.conftest import make_chat_examples, write_jsonl

    # head_dim 64: vLLM's attention kernels do not take the tests' usual 16
    model = build_tiny_model(tmp_path / "model", hidden_size=256, layers=2, heads=4, kv_heads=2, max_positions=512)
    adapter = build_random_adapter(model, tmp_path / "adapter")
    inp = write_jsonl(tmp_path / "p.jsonl", make_chat_examples(5, seed=0))
    files = {}
    for engine in ("vllm", "transformers"):
        files[engine] = tmp_path / f"{engine}.jsonl"
        res = generate_file(input=inp, output=files[engine], adapter=str(adapter), max_new_tokens=8,
                            keep_unfinished=True, engine=engine, progress=False)
        assert res["engine"] == engine and res["written"] == 5, res
    rows = {k: [json.loads(ln) for ln in f.read_text().splitlines()] for k, f in files.items()}
    assert [r["messages"][:-1] for r in rows["vllm"]] == [r["messages"][:-1] for r in rows["transformers"]]
    same = sum(a["messages"][-1] == b["messages"][-1] for a, b in zip(rows["vllm"], rows["transformers"]))
    assert same >= 4, rows


def test_grpo_generates_and_trains_on_the_gpu_against_a_reference(tiny_model, chat_data, tmp_path):
    """method grpo on CUDA (bf16 rollouts through transformers' generate, TRL's loss, the LoRA reference
    adapter with beta > 0): every step logs rewards, KL and its rollout throughput, the plan's memory
    check is recorded, and `finetune eval` scores the held-out chats with the run's reward functions."""
    out = tmp_path / "run"
    _run([sys.executable, "-m", "finetune", "train", *_overrides(
        tiny_model, chat_data, out, "method=grpo", "grpo.rewards=[{type: exact_match}, {type: length_penalty}]",
        "grpo.num_generations=4", "grpo.max_completion_length=16", "grpo.beta=0.04", "training.logging_steps=1",
        "training.max_steps=3")])
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    logged = [r for r in rows if "loss" in r]
    assert len(logged) == 3 and all("kl" in r and "rewards/exact_match/mean" in r for r in logged), logged
    assert all(r["rollout/tokens_per_s"] > 0 and 0 < r["rollout/share"] < 1 for r in logged), logged
    assert any("memory_plan_bytes" in r for r in rows), rows
    info = json.loads((out / "run.json").read_text())
    assert info["throughput"]["rollout_tokens"] > 0
    # MFU of both phases against the GPU's peak (its datasheet row, or a measured bf16 matmul)
    assert all(0 < r[k] < 1 for r in logged for k in ("mfu", "train/mfu", "rollout/mfu")), logged
    assert info["throughput"]["mfu_peak"].startswith(torch.cuda.get_device_name(0)), info["throughput"]
    _run([sys.executable, "-m", "finetune", "eval", "--adapter", str(out / "adapter"), "--data",
          str(chat_data["eval"]), "--output", str(tmp_path / "eval"), "--max-new-tokens", "16"])
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["models"]["tuned"]["rewards"]["n"] > 0 and "cuda" in report["meta"]["device"]
