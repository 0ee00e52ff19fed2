"""The quickstart path end to end at a toy size (CI also runs the full one via the README)."""

import json

import pytest

from finetune.errors import RunDirError

pytestmark = pytest.mark.slow


def test_quickstart_runs_every_stage_and_refuses_to_overwrite(tmp_path):
    from finetune.quickstart import quickstart

    out = tmp_path / "qs"
    summary = quickstart(out, overrides=["training.max_steps=4", "eval.max_examples=8", "training.logging_steps=1"])
    for rel in ("data/train.jsonl", "data/test.jsonl", "data/rejects.jsonl", "data/report.json",
                "base-model/config.json", "run/adapter/adapter_model.safetensors", "run/eval/report.md",
                "run/eval/report.json", "run/eval/loss_curve.png", "run/eval/metrics_bars.png",
                "run/eval/predictions.jsonl", "quickstart.json"):
        assert (out / rel).is_file(), rel
    saved = json.loads((out / "quickstart.json").read_text())
    assert saved["test_examples"] == 8 and isinstance(saved["reply"], str)
    assert 0.0 <= summary["tuned_exact_match"] <= 1.0
    # The sample data's repeated rows and PII went where data-prep says they go.
    rejects = [json.loads(x) for x in (out / "data" / "rejects.jsonl").read_text().splitlines()]
    assert rejects and all(r["reason"] for r in rejects)
    assert "sales@harborgoods.example" not in (out / "data" / "train.jsonl").read_text() + \
        (out / "data" / "val.jsonl").read_text() + (out / "data" / "test.jsonl").read_text()
    with pytest.raises(RunDirError, match="--overwrite"):
        quickstart(out)


def test_quickstart_test_split_is_large_enough():
    """The issue's bar: at least 50 held-out examples, so EM is not a coin toss."""
    import tempfile

    from data_prep.build import build
    from finetune.quickstart import QUICKSTART_DATA

    with tempfile.TemporaryDirectory() as d:
        build([str(QUICKSTART_DATA / "pages"), str(QUICKSTART_DATA / "questions.csv")], d,
              seed=0, val_fraction=0.05, test_fraction=0.1, overwrite=True)
        n_test = sum(1 for _ in open(f"{d}/test.jsonl"))
    assert n_test >= 50
