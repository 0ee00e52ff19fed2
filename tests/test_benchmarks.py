"""The benchmark scripts run end to end at toy size (their figures come from full-size runs on demand;
see docs/benchmarks.md). What is checked here is that they measure what they claim to."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(script: str, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / script), "--smoke", "--work", str(tmp_path / "w"),
                           "--json", str(out), *extra], capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.slow
def test_bench_train_smoke(tmp_path):
    res, stdout = _run("bench_train.py", tmp_path, "--threads", "1", "--arms", "trl,kit,kit_cmd")
    trl, kit, cmd = res["trl"], res["kit"], res["kit_cmd"]
    assert res["ceiling_gflops"]["fp32"] > 0 and res["ceiling_gflops"]["bf16"] > 0
    # same data, epochs and batch size: the same number of optimizer steps
    assert trl["steps"] == kit["steps"] == math.ceil(96 / 8)
    # both train the answer tokens only (TRL also trains the newline after <|im_end|>)
    assert 0 < kit["trained_tokens_per_epoch"] <= trl["trained_tokens_per_epoch"] <= 1.2 * kit["trained_tokens_per_epoch"]
    for arm in (trl, kit):
        assert arm["tokens_per_s"] > arm["trained_tokens_per_s"] > 0
        assert 0 < arm["mfu_fp32"] < 1
        assert 0 < arm["eval_loss"] < math.log(320) + 1  # below a uniform guess over the vocabulary, +1
        assert arm["peak_rss_mb"] > 100
    assert "kit vs trl:" in stdout and "MFU fp32" in stdout
    # the command itself: same steps as the in-process arm; its wall time holds its training time
    # plus start-up; TRL's wall time (launch to end of training) holds its training time too
    assert cmd["steps"] == kit["steps"] and 0 < cmd["train_s"] < cmd["whole_s"]
    assert 0 < trl["train_s"] < trl["to_first_step_s"] + trl["train_s"] and trl["train_s"] < trl["whole_s"]
    assert 0 < cmd["eval_loss"] < math.log(320) + 1 and cmd["peak_rss_mb"] > 100
    assert "`finetune train` start to exit vs TRL script start to end of training:" in stdout


@pytest.mark.slow
def test_bench_gpu_smoke(tmp_path):
    """scripts/bench_gpu.py on CPU (a toy shape, 3 steps): each arm in its own process, figures that add
    up (MFU = TFLOP/s over the device's peak; the kit's own log measures the same run), the held-out
    NLL of every adapter. The padded kit arm and TRL's packed arm cover both kinds of batch."""
    res, stdout = _run("bench_gpu.py", tmp_path, "--arms", "kit,trl_packed")
    assert res["device"]["name"].startswith("CPU: measured fp32 matmul") and res["device"]["peak_flops"] > 0
    for arm in ("kit", "trl_packed"):
        r = res[arm]
        assert r["steps"] == 3 and r["tokens"] > 0 and r["train_s"] > 0, r
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["train_s"])
        assert r["mfu"] == pytest.approx(r["tflops"] * 1e12 / res["device"]["peak_flops"])
        assert 0 < r["mfu"] < 1 and r["peak_mem_gib"] > 0.05
        assert math.isfinite(r["first_loss"]) and 0 < r["held_out_nll"] < math.log(4096) + 1
    # TRL's packed rows hold max_length tokens, the kit's padded rows 8 chats: more tokens per step for TRL
    assert res["trl_packed"]["tokens"] > res["kit"]["tokens"]
    assert res["kit"]["own_log_mfu"] > 0  # the run's own throughput accounting (run.json)
    assert "kit / trl_packed tokens/s >= 1.5" in stdout and "held-out NLL" in stdout


@pytest.mark.slow
def test_bench_memory_smoke(tmp_path):
    res, stdout = _run("bench_memory.py", tmp_path)
    full, lora, qlora = (res[m]["model_state"] for m in ("full", "lora", "qlora"))
    # full fine-tuning: every weight trains, with a gradient and two AdamW moments of its size
    assert full["frozen weights"] == 0 and full["grads"] == full["trainable"]
    assert full["optimizer"] >= 2 * full["trainable"]
    # LoRA: frozen fp32 base plus small adapters; QLoRA: packed 4-bit weights and their quant state
    from finetune.plan.memory import ModelShape, lora_trainable_params, param_counts, resolve_model_config

    shape = ModelShape.from_config(*resolve_model_config(str(tmp_path / "w" / "model")))
    assert lora["trainable"] == qlora["trainable"] == 4 * lora_trainable_params(shape, 16, "all-linear")
    assert lora["frozen weights"] == 4 * param_counts(shape)["total"] and lora["quant state"] == 0
    assert qlora["quant state"] > 0 and qlora["frozen weights"] < lora["frozen weights"]
    assert full["total"] > lora["total"] > qlora["total"]
    for m in ("full", "lora", "qlora"):
        assert res[m]["peak"] > 0 and res[m]["plan_peak"] > 0 and 0 < res[m]["peak_anon"] <= res[m]["peak"] * 1.1
    assert "QLoRA model state / LoRA model state" in stdout
    # LoRA DPO holds the LoRA run's state plus one frozen copy of the adapter (its reference), not a
    # second copy of the base weights
    dpo = res["lora_dpo"]["model_state"]
    assert dpo["trainable"] == lora["trainable"] and dpo["grads"] == lora["grads"]
    assert dpo["frozen weights"] == lora["frozen weights"] + lora["trainable"]
    assert res["lora_dpo"]["peak"] > 0 and "LoRA DPO peak RSS / LoRA SFT peak RSS" in stdout
    # the SFT run with the sequences of DPO's forward: the same state as LoRA's, more activations
    assert res["lora_2x"]["model_state"] == lora and res["lora_2x"]["peak"] > 0
    assert res["lora_dpo_over_lora_2x"] > 0 and "same sequences per forward" in stdout


@pytest.mark.slow
def test_bench_data_path_smoke(tmp_path):
    res, stdout = _run("bench_data_path.py", tmp_path)
    arms = {(r["examples"], r["arm"]): r for r in res}
    for n in (500, 2000):
        for arm in ("kit_cold", "kit_warm", "trl"):
            r = arms[(n, arm)]
            assert 0 < r["first_step_s"] < 300 and r["peak_rss_mb"] > 100, r
        builds = (tmp_path / "w" / f"cache_{n}" / "builds.log").read_text().splitlines()
        assert len(builds) == 1  # the cold arm built the cache, the warm arm only read it
        assert arms[(n, "resume")]["skipped_batches"] == int(0.9 * (n // 8))
    assert "kit cold / TRL time to first step" in stdout and "warm peak RSS" in stdout


@pytest.mark.slow
def test_bench_data_path_smoke_on_preference_pairs(tmp_path):
    import pyarrow as pa

    # one size: the SFT smoke above checks how the figures grow with the data
    res, stdout = _run("bench_data_path.py", tmp_path, "--task", "dpo", "--sizes", "500")
    arms = {(r["examples"], r["arm"]): r for r in res}
    assert {a for _, a in arms} == {"kit_cold", "kit_warm", "trl"}  # no SFT resume measurement
    for n in (500,):
        for arm in ("kit_cold", "kit_warm", "trl"):
            r = arms[(n, arm)]
            assert 0 < r["first_step_s"] < 300 and r["peak_rss_mb"] > 100, r
        builds = (tmp_path / "w" / f"cache_dpo_{n}" / "builds.log").read_text().splitlines()
        assert len(builds) == 1  # the cold arm built the preference cache, the warm arm only read it
        first = json.loads((tmp_path / "w" / f"train_dpo_{n}.jsonl").open().readline())
        assert first["chosen"] != first["rejected"] and first["prompt"][-1]["role"] == "user"
        (shard,) = (tmp_path / "w" / f"cache_dpo_{n}").glob("*/shard-*.arrow")
        with pa.memory_map(str(shard)) as src:  # the kit trained DPO on cached pairs
            assert {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(pa.ipc.open_stream(src).schema.names)
    assert "kit cold / TRL time to first step" in stdout


@pytest.mark.slow
def test_bench_export_smoke(tmp_path):
    pytest.importorskip("gguf")
    res, stdout = _run("bench_export.py", tmp_path)
    assert [r["quant"] for r in res] == ["f16", "q8_0"]
    for r in res:
        # the child's own high-water mark, above what its imports alone hold
        assert r["peak_rss"] >= r["after_imports"] > 50 * 2**20
        assert r["peak_over_weights"] == pytest.approx(r["peak_rss"] / r["weights_bytes"])
        assert (tmp_path / "w" / f"gguf-{r['quant']}" / f"model-{r['quant']}.gguf").stat().st_size == r["gguf_bytes"]
    f16, q8 = res
    assert q8["gguf_bytes"] < f16["gguf_bytes"]  # 8.5 bits per weight against 16
    assert "peak RSS / one copy of the weights" in stdout


@pytest.mark.slow
def test_bench_distill_smoke(tmp_path):
    """The distilled student ends closer to the teacher on held-out conversations than the same
    student trained by SFT on the same data, steps and learning rate."""
    res, stdout = _run("bench_distill.py", tmp_path)
    sft, kd, init = res["sft"], res["distill"], res["initial_student"]
    assert sft["steps"] == kd["steps"] > 0 and sft["examples_seen"] == kd["examples_seen"]
    assert sft["tokens"] == kd["tokens"] > 0  # scored on the same held-out tokens
    assert kd["kl_to_teacher"] < sft["kl_to_teacher"] < init["kl_to_teacher"], res
    assert "distilled student's KL to the teacher:" in stdout


@pytest.mark.slow
def test_bench_verify_smoke(tmp_path):
    res, stdout = _run("bench_verify.py", tmp_path)
    arms = {(r["artifact"], r["cache"]) for r in res}
    assert {("data cache", "warm"), ("checkpoint", "warm")} <= arms
    for r in res:
        assert r["bytes"] > 0 and r["read"] > 0 and r["xxh3_128"] > 0 and r["sha256"] > 0, r
    ckpt = next(r for r in res if r["artifact"] == "checkpoint")
    assert ckpt["bytes"] == 200_000_000
    assert "xxh3 / read" in stdout and not (tmp_path / "w" / "checkpoint").exists()
