import json
import logging

import pytest

from finetune.eval.report import compare, format_table, higher_is_better, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _models():
    base = {
        "intrinsic": {
            "nll": 2.0,
            "perplexity": 7.389,
            "bits_per_byte": 1.3,
            "token_accuracy": 0.4,
            "tokens": 1234,
            "bytes": 5000,
        },
        "extrinsic": {
            "exact_match": 0.1,
            "f1": 0.5,
            "rouge_l": 0.4,
            "chrf": 0.3,
            "chrf_corpus": 0.31,
            "n": 60,
            "n_scored": 58,
            "n_invalid_reference": 2,
        },
        "lm_eval": {"arc_easy": {"acc,none": 0.6, "acc_stderr,none": 0.01, "alias": "arc_easy"}},
    }
    tuned = {
        "intrinsic": {
            "nll": 2.5,
            "perplexity": 12.18,
            "bits_per_byte": 1.3 * (1 + 1e-9),
            "token_accuracy": 0.5,
            "tokens": 1234,
            "bytes": 5000,
        },
        "extrinsic": {
            "exact_match": 0.3,
            "f1": 0.45,
            "rouge_l": 0.4,
            "chrf": 0.35,
            "chrf_corpus": 0.36,
            "n": 60,
            "n_scored": 60,
            "n_invalid_reference": 0,
            "my_metric": 0.9,
        },
        "lm_eval": {"arc_easy": {"acc,none": 0.7, "acc_stderr,none": 0.01, "alias": "arc_easy"}},
    }
    return base, tuned


def test_compare_direction_and_regressions():
    rows = compare(*_models())
    by_metric = {r["metric"]: r for r in rows}
    assert [r["metric"] for r in rows] == [
        "nll", "perplexity", "bits_per_byte", "token_accuracy",
        "exact_match", "f1", "rouge_l", "chrf", "chrf_corpus",
        "arc_easy/acc",
    ]  # fmt: skip
    nll = by_metric["nll"]
    assert nll == {"section": "intrinsic", "metric": "nll", "base": 2.0, "tuned": 2.5,
                   "delta": pytest.approx(0.5), "higher_is_better": False, "regression": True}  # fmt: skip
    assert by_metric["perplexity"]["regression"] is True
    assert by_metric["bits_per_byte"]["regression"] is False  # 1e-9 relative: float noise
    assert by_metric["token_accuracy"]["regression"] is False
    assert by_metric["exact_match"]["regression"] is False
    assert by_metric["f1"]["regression"] is True
    assert by_metric["f1"]["delta"] == pytest.approx(-0.05)
    assert by_metric["rouge_l"]["regression"] is False  # equal
    assert by_metric["arc_easy/acc"]["section"] == "lm_eval"
    assert by_metric["arc_easy/acc"]["regression"] is False


def test_compare_lower_is_better_improvement_is_not_a_regression():
    rows = compare(
        {"intrinsic": {"nll": 2.0, "eval_loss": 1.0}}, {"intrinsic": {"nll": 1.5, "eval_loss": 0.9}}
    )
    assert [(r["metric"], r["regression"]) for r in rows] == [("nll", False), ("eval_loss", False)]
    rows = compare({"extrinsic": {"f1": 0.5}}, {"extrinsic": {"f1": 0.5 - 1e-4}})
    assert rows[0]["regression"] is True


def test_compare_with_missing_model():
    base, tuned = _models()
    assert compare(base, None) == []
    assert compare(None, tuned) == []


@pytest.mark.parametrize(
    ("metric", "higher"),
    [("nll", False), ("eval_loss", False), ("wikitext/word_perplexity", False),
     ("wikitext/byte_perplexity,none", False), ("bits_per_byte", False), ("f1", True),
     ("arc_easy/acc_norm", True), ("token_accuracy", True)],
)  # fmt: skip
def test_higher_is_better(metric, higher):
    assert higher_is_better(metric) is higher


def test_format_table_aligns_and_flags():
    text = format_table(compare(*_models()))
    lines = text.splitlines()
    assert lines[0].split() == ["section", "metric", "base", "tuned", "delta"]
    nll = next(line for line in lines if " nll " in line)
    assert nll.split() == ["intrinsic", "nll", "2.0000", "2.5000", "+0.5000", "⚠", "regression"]
    assert "regression" not in next(line for line in lines if " exact_match " in line)
    # numbers right-aligned: every delta ends at the same column
    ends = {line.index(word) + len(word) for line in lines[1:] for word in [line.split()[4]]}
    assert len(ends) == 1
    assert format_table([]) == "(no metric present in both base and tuned)"


def _write_jsonl(path):
    lines = [
        json.dumps({"step": 1, "loss": 2.5, "learning_rate": 1e-4}),
        "{not json",
        json.dumps({"step": 2, "loss": 2.0, "learning_rate": 2e-4}),
        json.dumps({"loss": 9.0}),  # no step
        "",
        json.dumps(["step", 3]),
        json.dumps({"step": 4, "loss": 1.5, "eval_loss": 1.8, "learning_rate": 1e-4}),
    ]
    path.write_text("\n".join(lines) + "\n")


def test_write_report_writes_all_files(tmp_path, caplog):
    base, tuned = _models()
    report = {"models": {"base": base, "tuned": tuned}, "meta": {"run_dir": "runs/demo", "seconds": 12.5}}
    jsonl = tmp_path / "metrics.jsonl"
    _write_jsonl(jsonl)
    out = tmp_path / "eval"

    with caplog.at_level(logging.WARNING, logger="finetune.eval.report"):
        paths = write_report(out, report, metrics_jsonl=jsonl)

    assert paths == {
        "json": out / "report.json",
        "markdown": out / "report.md",
        "loss_curve": out / "loss_curve.png",
        "metrics_bars": out / "metrics_bars.png",
    }
    for key in ("loss_curve", "metrics_bars"):
        data = paths[key].read_bytes()
        assert data[:8] == PNG_MAGIC
        assert len(data) > 10_000
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths.values())  # no temp files

    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 3
    assert warned[0].startswith(f"{jsonl}:2: skipped")
    assert warned[1].startswith(f"{jsonl}:4: skipped")
    assert warned[2].startswith(f"{jsonl}:6: skipped")

    saved = json.loads(paths["json"].read_text())
    assert saved["models"] == report["models"]
    assert saved["meta"] == report["meta"]
    assert saved["comparison"] == json.loads(json.dumps(compare(base, tuned)))
    assert "comparison" not in report  # input not modified

    md = paths["markdown"].read_text()
    assert "| metric | base | tuned | Δ | flag |" in md
    assert "| nll | 2.0000 | 2.5000 | +0.5000 | ⚠ regression |" in md
    assert "| exact_match | 0.1000 | 0.3000 | +0.2000 |  |" in md
    assert "| my_metric | — | 0.9000 | — |  |" in md  # in one model only
    assert "| arc_easy/acc | 0.6000 | 0.7000 | +0.1000 |  |" in md
    assert "stderr" not in md
    assert md.index("## Intrinsic") < md.index("## Extrinsic") < md.index("## lm-eval") < md.index("## Meta")
    assert "![Training loss](loss_curve.png)" in md
    assert "![Metrics by model](metrics_bars.png)" in md
    assert "- **run_dir**: `runs/demo`" in md
    assert "10 metrics compared; tuned is worse than base on 3." in md


def test_write_report_base_only_without_loss_points(tmp_path):
    base, _ = _models()
    jsonl = tmp_path / "metrics.jsonl"
    jsonl.write_text(json.dumps({"step": 1, "learning_rate": 1e-4}) + "\n")

    paths = write_report(tmp_path / "eval", {"models": {"base": base}}, metrics_jsonl=jsonl)

    assert set(paths) == {"json", "markdown", "metrics_bars"}
    assert not (tmp_path / "eval" / "loss_curve.png").exists()
    md = paths["markdown"].read_text()
    assert "| metric | base |\n|---|---:|" in md
    assert "| f1 | 0.5000 |" in md
    assert "Δ" not in md and "loss_curve.png" not in md
    assert json.loads(paths["json"].read_text())["comparison"] == []


def test_write_report_overwrites_atomically(tmp_path):
    base, tuned = _models()
    write_report(tmp_path, {"models": {"base": base, "tuned": tuned}})
    tuned["extrinsic"]["f1"] = 0.9
    paths = write_report(tmp_path, {"models": {"base": base, "tuned": tuned}})
    assert "| f1 | 0.5000 | 0.9000 | +0.4000 |  |" in paths["markdown"].read_text()
    assert not list(tmp_path.glob(".*.tmp"))
