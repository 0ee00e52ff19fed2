"""`finetune eval` on 2 CPU processes (gloo) gives the single-process numbers, once per example.

    accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 2 -m finetune eval ...

Each rank scores a shard; the NLL/token/byte sums are all-reduced and the predictions gathered, so
the report must equal a plain one-example-at-a-time hand computation, and world size must really be
2 (a rank scoring alone would also write a plausible report).
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.finetune.test_evaluate import _hand_nll

REPO = Path(__file__).resolve().parents[2]
ACCELERATE = Path(sys.executable).with_name("accelerate")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_eval_equals_hand_computation(tiny_model, chat_data, tmp_path):
    out = tmp_path / "eval"
    cmd = [str(ACCELERATE), "launch", "--config_file", "configs/accelerate/ddp.yaml", "--num_processes", "2",
           "--main_process_port", str(_free_port()), "-m", "finetune", "eval", "--model", str(tiny_model),
           "--data", str(chat_data["eval"]), "--output", str(out), "--max-new-tokens", "4",
           "--batch-size", "5", "--metrics", "exact_match"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"2-process eval hung\n{stdout[-4000:]}\n{stderr[-4000:]}")
    why = f"\nexit {proc.returncode}\n--- stdout\n{stdout[-4000:]}\n--- stderr\n{stderr[-4000:]}"
    assert proc.returncode == 0, why

    report = json.loads((out / "report.json").read_text())
    assert report["meta"]["world_size"] == 2, why
    assert stdout.count("report: ") == 1, why  # rank 0 alone wrote and announced the files

    nll, n_tok, n_bytes = _hand_nll(tiny_model, chat_data["eval"])
    got = report["models"]["base"]["intrinsic"]
    assert got["tokens"] == n_tok and got["bytes"] == n_bytes, got
    assert got["perplexity"] == pytest.approx(math.exp(nll / n_tok), rel=1e-4)
    assert got["bits_per_byte"] == pytest.approx(nll / (math.log(2) * n_bytes), rel=1e-4)

    n_examples = len(chat_data["eval"].read_text().splitlines())
    preds = [json.loads(ln) for ln in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["line"] for p in preds] == list(range(1, n_examples + 1))  # each once, in file order
    assert report["models"]["base"]["extrinsic"]["n"] == n_examples
