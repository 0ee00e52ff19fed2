"""Pre-emption, full disks and safe loading: a user never loses a run or runs code they did not trust."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.finetune.test_distributed import ACCELERATE, REPO, _free_port

pytestmark = pytest.mark.slow


def _config(tmp_path: Path, tiny_model, chat_data, **training) -> Path:
    cfg = {
        "model": str(tiny_model), "output_dir": str(tmp_path / "run"), "seed": 0, "max_length": 128,
        "data": {"train": str(chat_data["train"])},
        "training": {"batch_size": 2, "learning_rate": 1e-3, "logging_steps": 1, "report_to": ["none"],
                     **training},
        "lora": {"r": 4},
    }
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _limit_file_size_child(cfg: Path, event: str, condition: str) -> str:
    """Python source for a child that runs `finetune train cfg` (as the CLI does: SIGXFSZ ignored,
    errors mapped to exit codes) and sets RLIMIT_FSIZE to 4 KiB at `event` when `condition` holds."""
    return f"""
import resource, signal, sys
from transformers import TrainerCallback
from finetune.cli import main
import finetune.training.recipe as T

class LimitFileSize(TrainerCallback):
    def {event}(self, args, state, control, **kw):
        if {condition}:
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

train = T.train
T.train = lambda cfg: train(cfg, callbacks=[LimitFileSize()])
sys.exit(main(["train", {str(cfg)!r}]))
"""


def _steps(run: Path) -> list[int]:
    return [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()
            if ln.strip() and "loss" in json.loads(ln)]


@pytest.mark.distributed
def test_sigterm_on_two_ranks_saves_exits_and_resumes(tiny_model, chat_data, tmp_path):
    grace = 30
    cfg = _config(tmp_path, tiny_model, chat_data, max_steps=400, save_steps=1000, preemption_grace_s=grace)
    c = yaml.safe_load(cfg.read_text())
    c["data"]["cache_dir"] = str(tmp_path / "cache")  # this test damages its cache: its own
    cfg.write_text(yaml.safe_dump(c))
    run = tmp_path / "run"
    cmd = [str(ACCELERATE), "launch", "--config_file", "configs/accelerate/ddp.yaml", "--num_processes", "2",
           "--main_process_port", str(_free_port()), "-m", "finetune", "train", str(cfg)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if (run / "metrics.jsonl").exists() and len(_steps(run)) >= 5:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        # Like Slurm/scancel: every process of the job gets the signal, launcher and ranks alike.
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=grace + 30)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert elapsed < grace, f"took {elapsed:.0f} s to stop\n{out[-4000:]}"
    assert proc.returncode != 0  # never a silent success: the run is not finished
    ckpts = [p for p in (run / "checkpoints").glob("checkpoint-*") if (p / "COMPLETE").is_file()]
    assert len(ckpts) == 1, out[-4000:]
    stopped_at = int(ckpts[0].name.split("-")[1])
    assert 5 <= stopped_at < 400
    assert "Pre-empted (SIGTERM)" in out
    # Both ranks saved their part (DDP: rank 0 writes weights, every rank its RNG state).
    assert (ckpts[0] / "rng_state_0.pth").is_file() and (ckpts[0] / "rng_state_1.pth").is_file()
    assert not (run / "adapter").exists()
    # The two ranks hashed the checkpoint between them; the manifest covers both ranks' files.
    hashed = json.loads((ckpts[0] / "checksums.json").read_text())["files"]
    assert {"adapter_model.safetensors", "optimizer.pt", "rng_state_0.pth", "rng_state_1.pth"} <= set(hashed)

    resume = [*cmd[:7], str(_free_port()), *cmd[8:], "resume=true", "training.max_steps=" + str(stopped_at + 6)]
    # A damaged checkpoint: rank 0 finds it, and both ranks stop with its error (no rank hangs).
    from tests.kitcore.test_integrity import flip_middle

    weights = ckpts[0] / "adapter_model.safetensors"
    flip_middle(weights)
    t0 = time.monotonic()
    res = subprocess.run(resume, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and f"{weights}: content differs" in res.stdout + res.stderr, res.stderr[-3000:]
    assert time.monotonic() - t0 < 120
    flip_middle(weights)  # repaired
    # A damaged data cache shard: rank 0 verifies it, names it and rebuilds it; rank 1 waits for it.
    [cache] = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    shard = next(cache.glob("shard-*.arrow"))
    flip_middle(shard)
    res = subprocess.run([*resume[:7], str(_free_port()), *resume[8:]], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"{shard.name}: content differs" in res.stderr and "rebuilding it" in res.stderr, res.stderr[-3000:]
    assert len((tmp_path / "cache" / "builds.log").read_text().splitlines()) == 2
    assert _steps(run) == list(range(1, stopped_at + 7))
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tiny_model, chat_data, tmp_path):
    """A file-size limit (RLIMIT_FSIZE) set after the first checkpoint makes the second one fail."""
    cfg = _config(tmp_path, tiny_model, chat_data, max_steps=20, save_steps=5)
    run = tmp_path / "run"
    child = _limit_file_size_child(cfg, "on_save", "state.global_step == 5")  # the disk is "full" from now on
    res = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "could not write checkpoint" in res.stderr and "checkpoint-10" in res.stderr, res.stderr[-3000:]
    assert "checkpoint-5" in res.stderr  # names the intact one
    ckpt_dir = run / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["checkpoint-5"]  # partial one removed
    assert not list(ckpt_dir.rglob("*.tmp"))
    # The previous checkpoint still loads and resumes to the end.
    done = subprocess.run([sys.executable, "-m", "finetune", "train", str(cfg), "resume=true"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Resuming from" in done.stdout and "checkpoint-5" in done.stdout
    assert _steps(run) == list(range(1, 21))


def test_pickle_weights_that_carry_code_are_refused(tiny_model, tmp_path):
    """A `.bin` checkpoint whose pickle runs code is not loaded (weights_only), with a clear message."""
    import shutil

    import torch

    from finetune.errors import UnsafeCheckpointError
    from finetune.models.loading import load_base_model

    evil = tmp_path / "evil-model"
    shutil.copytree(tiny_model, evil)
    state = {k: v for k, v in __import__("safetensors.torch", fromlist=["load_file"]).load_file(
        evil / "model.safetensors").items()}
    (evil / "model.safetensors").unlink()
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    state["payload"] = Payload()
    torch.save(state, evil / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match="pytorch_model.bin"):
        load_base_model(str(evil))
    assert not marker.exists()


def test_trust_remote_code_stays_off_unless_asked(tiny_model, chat_data, tmp_path):
    from finetune.config import load_config

    cfg = load_config(None, [f"model={tiny_model}", f"data.train={chat_data['train']}", f"output_dir={tmp_path}"])
    assert cfg.trust_remote_code is False
    # A model directory that needs remote code fails instead of running it.
    import shutil

    remote = tmp_path / "remote-model"
    shutil.copytree(tiny_model, remote)
    conf = json.loads((remote / "config.json").read_text())
    conf["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    conf["model_type"] = "evil-llama"
    (remote / "config.json").write_text(json.dumps(conf))
    marker = tmp_path / "ran"
    (remote / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    from finetune.models.loading import load_base_model

    with pytest.raises(Exception):  # noqa: B017 - whatever transformers raises, the code must not run
        load_base_model(str(remote))
    assert not marker.exists()


def test_trust_remote_code_when_asked_names_the_repository(tiny_model, caplog):
    from finetune.models.loading import load_base_model

    with caplog.at_level("WARNING", logger="finetune.models.loading"):
        load_base_model(str(tiny_model), trust_remote_code=True)
    assert any("trust_remote_code=True" in r.message and str(tiny_model) in r.message for r in caplog.records)


def test_full_disk_during_adapter_export_is_one_clear_error(tiny_model, chat_data, tmp_path):
    cfg = _config(tmp_path, tiny_model, chat_data, max_steps=10, save_steps=5)
    run = tmp_path / "run"
    child = _limit_file_size_child(cfg, "on_train_end", "True")
    res = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "could not write the adapter" in res.stderr and ".adapter.tmp" in res.stderr
    assert not (run / ".adapter.tmp").exists() and not (run / "adapter").exists()
    assert (run / "checkpoints" / "checkpoint-10" / "COMPLETE").is_file()
    # The error's advice works: resuming from the last checkpoint only exports.
    done = subprocess.run([sys.executable, "-m", "finetune", "train", str(cfg), "resume=true"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
