"""kill -9 a training run mid-way, resume it, and reach the final step with a continuous loss log."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

pytestmark = pytest.mark.slow


def kill_when_saved(cmd: list[str], checkpoint, env: dict | None = None, poll_s: float = 0.05) -> None:
    """Start `cmd` (a `finetune train`) and kill -9 its process group once `checkpoint` is COMPLETE."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True, env=env)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if (checkpoint / "COMPLETE").exists():
                break
            time.sleep(poll_s)
        assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_kill_9_then_resume_reaches_the_final_step(tiny_model, chat_data, tmp_path):
    out = tmp_path / "run"
    cfg = {
        "model": str(tiny_model), "output_dir": str(out), "seed": 0, "max_length": 128,
        "data": {"train": str(chat_data["train"])},
        "training": {"max_steps": 60, "batch_size": 4, "learning_rate": 1e-3, "save_steps": 10,
                     "save_total_limit": 2, "logging_steps": 1, "report_to": ["none"]},
        "lora": {"r": 4},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "finetune", "train", str(path)]
    ckpt = out / "checkpoints"
    kill_when_saved(cmd, ckpt / "checkpoint-20")
    killed_at = max(json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines() if ln)
    assert killed_at < 60, "killed too late to test anything"
    assert not (out / "adapter").exists()

    # Re-running without resume=true must refuse rather than start over silently.
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "resume=true" in refused.stderr

    done = subprocess.run([*cmd, "resume=true"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Resuming from" in done.stdout
    logs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln]
    steps = [m["step"] for m in logs if "loss" in m]
    assert steps == list(range(1, 61)), steps   # continuous: no gap, no replayed step left twice
    state = json.loads((ckpt / "checkpoint-60" / "trainer_state.json").read_text())
    assert state["global_step"] == 60
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    # The learning-rate schedule continued instead of restarting its warmup.
    lr = {m["step"]: m["learning_rate"] for m in logs if "learning_rate" in m}
    # (cosine after a 2-step warmup: ~0.7 x peak at step 21; a restarted warmup would be near 0).
    assert lr[21] > 0.5e-3
    after_warmup = [lr[s] for s in range(3, 61)]
    assert all(a >= b for a, b in zip(after_warmup, after_warmup[1:]))
