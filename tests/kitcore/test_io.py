"""One atomic write for both packages: outputs get the mode the umask says, never mkstemp's 0600."""

from __future__ import annotations

import csv
import os
import stat
from pathlib import Path

import pytest

from data_prep.build import build
from finetune.console import atomic_write_text
from finetune.eval.report import write_report
from kitcore.io import atomic_write_via


@pytest.fixture(params=[0o022, 0o002], ids=["umask022", "umask002"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _questions(path: Path) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["question", "answer"])
        for i in range(12):
            w.writerow([f"What does item number {i} of the shop cost today?", f"It costs {i + 3} euros."])
        w.writerow(["", "an answer without a question goes to rejects"])
    return path


def test_data_prep_build_outputs_get_the_umask_mode(umask, tmp_path: Path) -> None:
    out = tmp_path / "out"
    build([str(_questions(tmp_path / "q.csv"))], out, seed=0)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["checksums.json", "rejects.jsonl", "report.json", "test.jsonl", "train.jsonl", "val.jsonl"]
    for name in names:
        assert _mode(out / name) == 0o666 & ~umask, name


def test_atomic_write_text_of_finetune_train_gets_the_umask_mode(umask, tmp_path: Path) -> None:
    # the function `finetune train` writes run.json and config.yaml with
    run_json = atomic_write_text(tmp_path / "run" / "run.json", '{"world_size": 1}\n')
    assert run_json.read_text() == '{"world_size": 1}\n'
    assert _mode(run_json) == 0o666 & ~umask
    assert os.listdir(run_json.parent) == ["run.json"]


def test_eval_report_files_get_the_umask_mode(umask, tmp_path: Path) -> None:
    models = {"base": {"extrinsic": {"f1": 0.5}}, "tuned": {"extrinsic": {"f1": 0.7}}}
    paths = write_report(tmp_path, {"models": models})
    assert {"json", "markdown", "metrics_bars"} <= set(paths)
    for path in paths.values():
        assert _mode(path) == 0o666 & ~umask, path.name
    assert sorted(os.listdir(tmp_path)) == ["metrics_bars.png", "report.json", "report.md"]


def test_failed_callback_write_keeps_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "chart.png"
    target.write_bytes(b"old chart")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_bytes(b"half a chart")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_via(target, half_then_fail)
    assert target.read_bytes() == b"old chart"
    assert os.listdir(tmp_path) == ["chart.png"]
    atomic_write_via(target, lambda tmp: tmp.write_bytes(b"new chart"))
    assert target.read_bytes() == b"new chart" and os.listdir(tmp_path) == ["chart.png"]
