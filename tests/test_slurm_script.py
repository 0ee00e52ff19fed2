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


def test_slurm_data_prep_script_starts_a_head_then_a_worker_per_node_and_the_build(tmp_path):
    """scripts/slurm_data_prep.sh with stand-ins for srun, scontrol, ray and data-prep."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.jsonl"
    record = (f"#!{sys.executable}\nimport json, os, sys\n"
              f"open({str(calls)!r}, 'a').write(json.dumps([os.path.basename(sys.argv[0]), *sys.argv[1:]]) + '\\n')\n")
    for name in ("srun", "ray"):
        (bin_dir / name).write_text(record)
    # the build stands in for minutes of work: long enough for the background steps to record
    (bin_dir / "data-prep").write_text(record + (
        "import time\nfor _ in range(200):\n"
        f"    if open({str(calls)!r}).read().count('\"srun\"') >= 3: break\n    time.sleep(0.05)\n"))
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'node001\\nnode002\\nnode003\\n'\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "node[001-003]", "SLURM_CPUS_PER_TASK": "16", "RAY_HEAD_IP": "10.0.0.1"}
    res = subprocess.run(["bash", str(REPO / "scripts" / "slurm_data_prep.sh"), "recipe.yaml", "dedup.threshold=0.9"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    got = [json.loads(line) for line in calls.read_text().splitlines()]
    # the `ray start` steps run in the background: their lines may come in any order
    srun = sorted((c for c in got if c[0] == "srun"), key=lambda c: "--head" not in c)
    address = "10.0.0.1:24242"
    head = srun[0]
    assert head[head.index("-w") + 1] == "node001" and "--head" in head and "--port=24242" in head
    assert "--num-cpus=16" in head and "--block" in head
    workers = {c[c.index("-w") + 1]: c for c in srun[1:]}
    assert sorted(workers) == ["node002", "node003"]
    assert all(f"--address={address}" in c and "--num-cpus=16" in c for c in workers.values())
    # the head is asked before any worker is started (those steps start after the answer)
    assert got.index(next(c for c in got if c[0] == "ray")) < min(got.index(c) for c in srun[1:])
    (build,) = [c for c in got if c[0] == "data-prep"]
    assert build == ["data-prep", "run", "recipe.yaml", "engine=ray", f"ray.address={address}",
                     "ray.wait_for_nodes=3", "dedup.threshold=0.9"]
