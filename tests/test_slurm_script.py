"""scripts/slurm_train.sh, run with stand-ins for srun and scontrol that record what they get."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _run_script(tmp_path: Path, config: Path, *overrides: str) -> tuple[list[str], dict]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    record = tmp_path / "srun.json"
    (bin_dir / "srun").write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"json.dump({{'argv': sys.argv[1:], 'env': dict(os.environ)}}, open({str(record)!r}, 'w'))\n")
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho node001\n")
    for f in ("srun", "scontrol"):
        (bin_dir / f).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "8",
           "SLURM_JOB_NODELIST": "node[001-002]", "HF_HUB_OFFLINE": "1"}
    env.pop("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", None)
    res = subprocess.run(["bash", "scripts/slurm_train.sh", str(config), *overrides], cwd=tmp_path / "work",
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    rec = json.loads(record.read_text())
    return rec["argv"], rec["env"]


@pytest.mark.slow
def test_slurm_script_sets_the_shutdown_timeout_and_resumes_only_from_a_complete_checkpoint(
        tmp_path, tiny_model, chat_data):
    work = tmp_path / "work"
    (work / "scripts").mkdir(parents=True)
    (work / "scripts" / "slurm_train.sh").write_text((REPO / "scripts" / "slurm_train.sh").read_text())
    run = tmp_path / "run"
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"model": str(tiny_model), "data": {"train": str(chat_data["train"])},
                                      "output_dir": str(run), "training": {"preemption_grace_s": 200}}))
    argv, env = _run_script(tmp_path, config, "lora.r=4")
    assert env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "230"  # the grace period + 30 s for the save
    assert "NCCL_TIMEOUT" not in env or env["NCCL_TIMEOUT"] == os.environ.get("NCCL_TIMEOUT")
    assert "lora.r=4" in argv and "resume=true" not in argv  # nothing to resume yet

    ckpt = run / "checkpoints" / "checkpoint-5"
    ckpt.mkdir(parents=True)
    argv, _ = _run_script(tmp_path, config)
    assert "resume=true" not in argv  # a half-written checkpoint is not resumed from
    (ckpt / "COMPLETE").write_text("{}")
    argv, env = _run_script(tmp_path, config, "training.preemption_grace_s=60")
    assert "resume=true" in argv and env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "90"
