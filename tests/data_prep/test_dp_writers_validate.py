"""Atomic writes, validate's error listing, stats, the recipe schema and the CLI surface."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from data_prep import build as build_mod
from data_prep.cli import main
from data_prep.recipe import RecipeError, load_recipe
from data_prep.validate import stats_file, validate_file
from data_prep.writers import atomic_write

REPO = Path(__file__).resolve().parents[2]


def test_atomic_write_failure_keeps_previous_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "train.jsonl"
    target.write_text("old complete content\n")
    with pytest.raises(RuntimeError), atomic_write(target) as f:
        f.write("new partial line")
        raise RuntimeError("disk full")
    assert target.read_text() == "old complete content\n"
    assert os.listdir(tmp_path) == ["train.jsonl"]
    with atomic_write(target) as f:
        f.write("new\n")
    assert target.read_text() == "new\n" and os.listdir(tmp_path) == ["train.jsonl"]


def test_interrupted_build_leaves_no_output_that_looks_complete(
    shop: Path, tmp_path: Path, monkeypatch
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.jsonl").write_text('{"previous": true}\n')

    def boom(self, writers):
        for w in writers.values():
            w.write({"messages": []})  # half-written outputs exist as temp files at this point
        raise KeyboardInterrupt

    monkeypatch.setattr(build_mod.Builder, "_split_and_write", boom)
    with pytest.raises(KeyboardInterrupt):
        build_mod.build([shop / "pages", shop / "questions.csv"], out, overwrite=True)
    assert sorted(os.listdir(out)) == ["train.jsonl"]
    assert (out / "train.jsonl").read_text() == '{"previous": true}\n'


def _write(path: Path, lines: list) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


BAD_FILE = [
    {
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"},
        ]
    },
    ["not", "a", "dict"],
    {"messages": []},
    {"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]},
    {"messages": [{"role": "user", "content": "q", "extra": 1}, {"role": "assistant", "content": "a"}]},
    {"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]},
    {"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "a"}]},
    {"messages": [{"role": "user", "content": "q"}]},
    '{"messages": [',
    {"messages": [{"role": "assistant", "content": "a " * 30}]},
]


def test_validate_lists_every_bad_line_with_its_type(tmp_path: Path) -> None:
    res = validate_file(str(_write(tmp_path / "x.jsonl", BAD_FILE)), max_tokens=20)
    got = [(e.line, e.kind) for e in res.errors]
    assert got == [
        (2, "data_type"),
        (3, "missing_messages_list"),
        (4, "message_missing_key"),
        (4, "missing_content"),
        (5, "message_unrecognized_key"),
        (6, "unrecognized_role"),
        (7, "missing_content"),
        (8, "example_missing_assistant_message"),
        (9, "malformed_json"),
    ]
    warnings = {(w.line, w.kind) for w in res.warnings}
    assert warnings == {(10, "no_system_message"), (10, "no_user_message"), (10, "over_token_limit")}
    assert res.examples == 10 and not res.ok


def test_validate_cli_exit_codes(tmp_path: Path, capsys) -> None:
    bad = _write(tmp_path / "bad.jsonl", BAD_FILE)
    assert main(["validate", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "line 9: error malformed_json" in out and "line 6: error unrecognized_role" in out
    good = _write(tmp_path / "good.jsonl", [BAD_FILE[0]])
    assert main(["validate", str(good)]) == 0


def test_stats(tmp_path: Path) -> None:
    path = _write(tmp_path / "s.jsonl", [BAD_FILE[0], BAD_FILE[0], "{oops"])
    s = stats_file(str(path))
    assert s["examples"] == 3 and s["unparseable"] == 1
    assert s["messages_by_role"] == {"system": 2, "user": 2, "assistant": 2}
    assert s["example_total"]["max"] == 3 and s["unit"] == "words"


def test_help_lists_subcommands(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("build", "run", "validate", "stats"):
        assert cmd in out


def test_recipe_reports_every_problem_at_once(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "sources": [{"path": str(tmp_path / "missing.csv"), "fromat": "csv"}],
                "output_dir": str(tmp_path / "o"),
                "dedup": {"threshold": "high"},
                "split": {"seed": "x"},
                "workrs": 2,
            }
        )
    )
    with pytest.raises(RecipeError) as exc:
        load_recipe(path)
    problems = exc.value.problems
    keys = [p.split(":")[0] for p in problems]
    assert keys == ["sources.0.path", "sources.0.fromat", "dedup.threshold", "split.seed", "workrs"]
    assert main(["run", str(path)]) == 2


def test_every_shipped_recipe_loads_and_overrides_apply(tmp_path: Path, shop: Path, monkeypatch) -> None:
    recipes = sorted((REPO / "configs" / "data").glob("*.yaml"))
    assert recipes
    monkeypatch.chdir(tmp_path)
    # the shipped recipes point at finetune/quickstart_data; stand in our fixture of the same shape
    qs = tmp_path / "finetune" / "quickstart_data"
    qs.parent.mkdir(parents=True)
    shop.rename(qs)
    for path in recipes:
        r = load_recipe(path, ["dedup.threshold=0.9", "split.seed=4", f"output_dir={tmp_path / path.stem}"])
        assert r.dedup.threshold == 0.9 and r.split.seed == 4
    assert main(["run", str(recipes[0]), f"output_dir={tmp_path / 'run'}"]) == 0
    assert (tmp_path / "run" / "report.json").exists()
