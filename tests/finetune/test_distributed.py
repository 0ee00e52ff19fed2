"""2-process training on CPU (gloo), launched the way a cluster launches it:

    accelerate launch --config_file configs/accelerate/<file> --num_processes 2 -m finetune train CONFIG ...

with tests/finetune/rank_probe.py in place of `-m finetune` (the same CLI, plus a callback), so
every rank writes run/rank_probe/rank-N.json (pid, world size as its process group sees it, hashes
of its first batches, a sum of its trainable weights). A rank that silently trains alone looks
like success from rank 0's files, so the tests check both ranks.

The first DeepSpeed run on a machine JIT-builds DeepSpeed's shm comm op (~40 s, then cached in
~/.cache/torch_extensions); after that the whole file takes about 2 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path

import pytest
import yaml

from finetune.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
RANK_PROBE = Path(__file__).with_name("rank_probe.py")  # `finetune train` plus a per-rank probe
ACCELERATE = Path(sys.executable).with_name("accelerate")
TIMEOUT_S = 300
MAX_STEPS = 8

needs_deepspeed = pytest.mark.skipif(find_spec("deepspeed") is None, reason="deepspeed not installed")


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_config(tmp_path: Path, tiny_model: Path, chat_data, **extra) -> tuple[Path, Path]:
    run = tmp_path / "run"
    cfg = {
        "model": str(tiny_model),
        "data": {"train": str(chat_data["train"])},
        "output_dir": str(run),
        "max_length": 128,
        "seed": 0,
        "lora": {"r": 8},
        "training": {"max_steps": MAX_STEPS, "batch_size": 4, "logging_steps": 1, "learning_rate": 5e-3,
                     "warmup": 0, "lr_scheduler": "constant", "report_to": ["none"]},
    }
    for key, value in extra.items():  # one level of nesting is enough here
        if isinstance(value, dict):
            cfg.setdefault(key, {}).update(value)
        else:
            cfg[key] = value
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, run


def _launch(accelerate_config: str, train_config: Path, *overrides: str, env: dict | None = None,
            timeout: float = TIMEOUT_S) -> tuple[subprocess.CompletedProcess, float]:
    """Run the cluster command from the repository root (accelerate yamls name relative paths)."""
    cmd = [str(ACCELERATE), "launch", "--config_file", f"configs/accelerate/{accelerate_config}",
           "--num_processes", "2", "--main_process_port", str(_free_port()),
           str(RANK_PROBE), "train", str(train_config), *overrides]
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    t0 = time.monotonic()
    # A new session, so a timeout kills the launcher and both ranks, not just the launcher.
    proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} did not finish in {timeout} s\n--- stdout\n{out[-8000:]}\n"
                    f"--- stderr\n{err[-8000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), time.monotonic() - t0


def _show(res: subprocess.CompletedProcess) -> str:
    return f"\n$ {' '.join(res.args)}\nexit {res.returncode}\n--- stdout\n{res.stdout[-8000:]}\n" \
           f"--- stderr\n{res.stderr[-8000:]}"


def _run_ok(accelerate_config: str, train_config: Path, *overrides: str) -> subprocess.CompletedProcess:
    res, _ = _launch(accelerate_config, train_config, *overrides)
    assert res.returncode == 0, _show(res)
    return res


def _probes(run: Path) -> list[dict]:
    return [json.loads((run / "rank_probe" / f"rank-{r}.json").read_text()) for r in (0, 1)]


def _check_two_ranks_trained(run: Path, res, *, replicated: bool = True) -> list[dict]:
    """World size 2, different data per rank, loss down, weights in step, a complete checkpoint."""
    why = _show(res)
    assert json.loads((run / "run.json").read_text())["world_size"] == 2, why
    assert "world size       2" in res.stdout, why
    p0, p1 = _probes(run)
    assert (p0["rank"], p1["rank"]) == (0, 1) and p0["world_size"] == p1["world_size"] == 2, why
    assert p0["pid"] != p1["pid"]
    seen0 = {h for batch in p0["batches"] for h in batch}
    seen1 = {h for batch in p1["batches"] for h in batch}
    assert len(seen0) >= 8 and len(seen1) >= 8, (p0["batches"], p1["batches"])
    assert not seen0 & seen1, f"ranks saw the same examples: {seen0 & seen1}"
    if replicated:
        # Gradients were averaged: both ranks end with the same weights (unsynced ranks drift apart).
        assert p0["trainable_sum"] == pytest.approx(p1["trainable_sum"], rel=1e-6, abs=1e-9), (p0, p1)
    metrics = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == MAX_STEPS and losses[-1] < losses[0] - 0.2, losses
    # 8 steps x 4 per rank x 2 ranks = 64 of 96 examples: the epoch counter proves the sharding too.
    assert metrics[-1]["epoch"] == pytest.approx(MAX_STEPS * 4 * 2 / 96, abs=0.01), metrics[-1]
    assert (run / "checkpoints" / f"checkpoint-{MAX_STEPS}" / "COMPLETE").is_file(), why
    # Throughput over both ranks: every training log has it, and the tokens counted on each rank and
    # summed at each log add up to what the Trainer gathered (num_input_tokens_seen).
    logged = [m for m in metrics if "loss" in m]
    assert all(m["tokens_per_s"] > 0 and 0 < m["mfu"] <= m["mfu_6n"] for m in logged), logged
    through = json.loads((run / "run.json").read_text())["throughput"]
    assert through["tokens"] == logged[-1]["num_input_tokens_seen"], (through, logged[-1])
    return [p0, p1]


def _check_adapter(run: Path, tiny_model: Path, r: int = 8) -> dict:
    """Full-size LoRA weights, trained, loadable by plain PEFT and by finetune.inference.load."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from finetune.inference.load import load_for_inference

    adapter = run / "adapter"
    weights = load_file(adapter / "adapter_model.safetensors")
    lora_a = {k: v for k, v in weights.items() if "lora_A" in k}
    lora_b = {k: v for k, v in weights.items() if "lora_B" in k}
    assert lora_a and len(lora_a) == len(lora_b), sorted(weights)
    # 2 layers x 7 linear layers, each A (r, in) and B (out, r) in full: a ZeRO-3 save without
    # gathering gives empty (0-element) tensors.
    assert len(lora_b) == 14, sorted(lora_b)
    # Nothing but LoRA matrices: no config here asks for modules_to_save. (ZeRO-3 once saw its
    # embeddings as 0-row shards, "resized" them to the tokenizer and trained them in full.)
    assert set(weights) == set(lora_a) | set(lora_b), sorted(set(weights) - set(lora_a) - set(lora_b))
    assert not json.loads((adapter / "adapter_config.json").read_text()).get("modules_to_save")
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    base_shapes = {k: tuple(v.shape) for k, v in base.state_dict().items()}
    for k, v in {**lora_a, **lora_b}.items():
        module = k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        out_f, in_f = base_shapes[f"{module}.weight"]
        assert tuple(v.shape) == ((r, in_f) if ".lora_A." in k else (out_f, r)), (k, tuple(v.shape))
    assert all(v.abs().sum() > 0 for v in lora_b.values()), "lora_B still zero: nothing was trained"

    peft_model = PeftModel.from_pretrained(base, adapter)
    loaded = dict(peft_model.named_parameters())
    key = next(iter(lora_b))
    match = [n for n in loaded if n.endswith(key.removeprefix("base_model.model.").replace(".weight", ".default.weight"))]
    assert match and loaded[match[0]].detach().equal(lora_b[key]), (key, match)

    model, tok = load_for_inference(adapter)
    ids = tok.apply_chat_template([{"role": "user", "content": "How much is the red lamp?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    return weights


# ----------------------------------------------------------------------------------------------
# 2-process runs
# ----------------------------------------------------------------------------------------------
@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_two_ranks_train_one_adapter(tiny_model, chat_data, tmp_path):
    # eval.after_train runs on rank 0 alone once the others are done: it must not wait for them.
    config, run = _write_config(tmp_path, tiny_model, chat_data, eval={
        "after_train": True, "data": str(chat_data["eval"]), "max_examples": 4, "max_new_tokens": 4,
        "metrics": ["exact_match"]})
    res = _run_ok("ddp.yaml", config)
    _check_two_ranks_trained(run, res)
    assert "ZeRO stage off" in res.stdout
    _check_adapter(run, tiny_model)
    report = json.loads((run / "eval" / "report.json").read_text())
    assert report["models"]["tuned"]["extrinsic"]["n"] == 4, report  # all of them, not rank 0's half


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_two_ranks_train_on_token_budget_batches(tiny_model, chat_data, tmp_path):
    """training.tokens_per_batch under DDP: each rank takes every other budget batch (no example twice),
    the ranks stay in step, and the plan's longest batch is within the budget."""
    config, run = _write_config(tmp_path, tiny_model, chat_data, training={"tokens_per_batch": 512})
    res = _run_ok("ddp.yaml", config)
    p0, p1 = _probes(run)
    seen0 = {h for batch in p0["batches"] for h in batch}
    seen1 = {h for batch in p1["batches"] for h in batch}
    assert seen0 and seen1 and not seen0 & seen1, (p0["batches"], p1["batches"])
    assert len({len(b) for b in p0["batches"] + p1["batches"]}) > 1, "rows vary with the examples' lengths"
    assert p0["trainable_sum"] == pytest.approx(p1["trainable_sum"], rel=1e-6, abs=1e-9), (p0, p1)
    losses = [json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]
    assert len(losses) == MAX_STEPS and losses[-1] < losses[0], losses
    assert "up to 512 per micro-batch x 1 accum x 2 ranks" in res.stdout, _show(res)
    mem = json.loads((run / "run.json").read_text())["memory"]
    rows, per_row = (int(x) for x in mem["batch"].split(" tokens")[0].split(" x "))
    assert rows * per_row <= 512, mem
    _check_adapter(run, tiny_model)


@needs_deepspeed
@pytest.mark.distributed
@pytest.mark.slow
def test_zero2_with_matching_deepspeed_key(tiny_model, chat_data, tmp_path):
    # The training config names the same JSON as the accelerate file: allowed.
    config, run = _write_config(tmp_path, tiny_model, chat_data, deepspeed="configs/deepspeed/zero2.json")
    res = _run_ok("deepspeed_zero2.yaml", config)
    _check_two_ranks_trained(run, res)
    assert "ZeRO stage 2" in res.stdout, _show(res)
    _check_adapter(run, tiny_model)


@needs_deepspeed
@pytest.mark.distributed
@pytest.mark.slow
def test_zero3_uses_the_launchers_json_and_saves_a_gathered_adapter(tiny_model, chat_data, tmp_path):
    # `deepspeed` unset: the accelerate file's deepspeed_config_file is used and recorded.
    # r=16 puts every LoRA matrix (>= 16 x 64 values) above stage3_param_persistence_threshold
    # ("auto" = 10 x hidden = 640), so ZeRO-3 really partitions them.
    config, run = _write_config(tmp_path, tiny_model, chat_data, lora={"r": 16})
    res = _run_ok("deepspeed_zero3.yaml", config)
    p0, p1 = _check_two_ranks_trained(run, res, replicated=False)
    assert "ZeRO stage 3" in res.stdout, _show(res)
    assert yaml.safe_load((run / "config.yaml").read_text())["deepspeed"] == "configs/deepspeed/zero3.json"
    weights = _check_adapter(run, tiny_model, r=16)
    saved = sum(v.numel() for k, v in weights.items() if "lora_" in k)
    # Each rank held only shards of the LoRA weights; the saved adapter holds all of them.
    assert p0["trainable_numel"] < saved and p1["trainable_numel"] < saved, (p0, p1, saved)


@needs_deepspeed
@pytest.mark.distributed
@pytest.mark.slow
def test_qlora_under_zero2(tiny_model, chat_data, tmp_path):
    pytest.importorskip("bitsandbytes")
    config, run = _write_config(tmp_path, tiny_model, chat_data, adapter="qlora",
                                deepspeed="configs/deepspeed/zero2.json")
    res = _run_ok("deepspeed_zero2.yaml", config)
    probes = _check_two_ranks_trained(run, res)
    assert all("Linear4bit" in p["module_types"] for p in probes), probes[0]["module_types"]
    assert "ZeRO stage 2" in res.stdout and "(qlora)" in res.stdout, _show(res)
    _check_adapter(run, tiny_model)


@needs_deepspeed
@pytest.mark.distributed
@pytest.mark.slow
def test_qlora_under_zero3(tiny_model, chat_data, tmp_path):
    """QLoRA + ZeRO-3: 4-bit weights stored in the compute dtype (quantization.storage_dtype auto,
    which DeepSpeed's cast leaves intact). The quantized model is loaded whole on every rank (not
    under zero.Init) and partitioned by deepspeed.initialize."""
    pytest.importorskip("bitsandbytes")
    config, run = _write_config(tmp_path, tiny_model, chat_data, adapter="qlora", lora={"r": 16},
                                deepspeed="configs/deepspeed/zero3.json")
    res = _run_ok("deepspeed_zero3.yaml", config)
    probes = _check_two_ranks_trained(run, res, replicated=False)
    assert all("Linear4bit" in p["module_types"] for p in probes), probes[0]["module_types"]
    assert "ZeRO stage 3" in res.stdout and "(qlora)" in res.stdout, _show(res)
    _check_adapter(run, tiny_model, r=16)


@pytest.mark.distributed
@pytest.mark.slow
def test_a_dead_rank_fails_the_job_instead_of_hanging(tiny_model, chat_data, tmp_path):
    config, run = _write_config(tmp_path, tiny_model, chat_data, training={"max_steps": 200, "ddp_timeout_s": 30})
    res, elapsed = _launch("ddp.yaml", config, env={"FINETUNE_RANK_PROBE_EXIT": "1:3"}, timeout=180)
    assert res.returncode != 0, _show(res)
    assert elapsed < 120, f"took {elapsed:.0f} s to notice a dead rank" + _show(res)
    assert "exitcode  : 1" in res.stderr, _show(res)  # torchrun names rank 1's own exit, not a timeout
    assert not (run / "adapter").exists()
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    assert steps and max(steps) < 10, steps


# ----------------------------------------------------------------------------------------------
# which DeepSpeed JSON: the training config's `deepspeed` key vs the accelerate file (no launch)
# ----------------------------------------------------------------------------------------------
def _ds_env(monkeypatch, path: str | None) -> None:
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    if path is None:
        monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", path)


def _cfg(tiny_model, chat_data, tmp_path, *over):
    return load_config(None, [f"model={tiny_model}", f"data.train={chat_data['train']}",
                              f"output_dir={tmp_path / 'run'}", *over])


def test_deepspeed_json_comes_from_the_launcher_when_unset(tiny_model, chat_data, tmp_path, monkeypatch):
    from finetune.training.launch import deepspeed_config

    _ds_env(monkeypatch, "configs/deepspeed/zero3.json")
    cfg = _cfg(tiny_model, chat_data, tmp_path)
    assert deepspeed_config(cfg) == "configs/deepspeed/zero3.json"


def test_deepspeed_key_and_launcher_must_agree(tiny_model, chat_data, tmp_path, monkeypatch):
    from finetune.training.launch import deepspeed_config

    _ds_env(monkeypatch, "configs/deepspeed/zero3.json")
    same = tmp_path / "copy_of_zero3.json"
    same.write_text((REPO / "configs/deepspeed/zero3.json").read_text())
    for ok in (str(REPO / "configs/deepspeed/zero3.json"), str(same)):  # same file, or same JSON
        cfg = _cfg(tiny_model, chat_data, tmp_path, f"deepspeed={ok}")
        assert deepspeed_config(cfg) == ok
    cfg = _cfg(tiny_model, chat_data, tmp_path, f"deepspeed={REPO / 'configs/deepspeed/zero2.json'}")
    with pytest.raises(ConfigError, match=r"deepspeed: .*zero2\.json differs from .*zero3\.json"):
        deepspeed_config(cfg)


def test_deepspeed_key_is_used_when_the_launcher_names_no_file(tiny_model, chat_data, tmp_path, monkeypatch):
    from finetune.training.launch import deepspeed_config

    _ds_env(monkeypatch, None)
    cfg = _cfg(tiny_model, chat_data, tmp_path, "deepspeed=configs/deepspeed/zero2.json")
    assert deepspeed_config(cfg) == "configs/deepspeed/zero2.json"
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "configs/deepspeed/missing.json")
    with pytest.raises(ConfigError, match="deepspeed_config_file: file not found"):
        deepspeed_config(cfg)
