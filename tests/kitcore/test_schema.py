"""One chat schema: `data-prep validate` and `finetune train`'s reader give every line the same verdict."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from data_prep.build import build
from data_prep.validate import validate_file
from finetune.data import DataError, read_chat_jsonl

ASSISTANT = {"role": "assistant", "content": "It is sunny."}
LINES = [
    # 1: plain chat
    {"messages": [{"role": "user", "content": "Weather in Oslo?"}, ASSISTANT]},
    # 2: OpenAI's legacy function-calling role
    {"messages": [{"role": "user", "content": "Weather in Oslo?"},
                  {"role": "function", "name": "weather", "content": "sunny"}, ASSISTANT]},
    # 3: a tool result
    {"messages": [{"role": "user", "content": "Weather in Lima?"}, {"role": "tool", "content": "sunny"}, ASSISTANT]},
    # 4: the developer role of newer OpenAI models
    {"messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Weather?"}, ASSISTANT]},
    # 5: a role nobody knows
    {"messages": [{"role": "robot", "content": "beep"}, ASSISTANT]},
    # 6: function as the only other turn
    {"messages": [{"role": "function", "content": "sunny"}, ASSISTANT]},
]


def _file(tmp_path: Path) -> Path:
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in LINES))
    return path


def test_validate_and_training_reader_agree_line_by_line(tmp_path: Path) -> None:
    path = _file(tmp_path)
    validate_bad = {e.line for e in validate_file(str(path)).errors}
    with pytest.raises(DataError) as exc:
        read_chat_jsonl(path)
    train_bad = {int(n) for n in re.findall(rf"{re.escape(str(path))}:(\d+):", str(exc.value))}
    assert validate_bad == train_bad == {2, 5, 6}


def test_function_role_is_refused_with_the_fix_by_both(tmp_path: Path) -> None:
    path = _file(tmp_path)
    errors = {e.line: e for e in validate_file(str(path)).errors}
    assert errors[2].kind == "unrecognized_role"
    assert "rename the role to 'tool'" in errors[2].detail
    with pytest.raises(DataError) as exc:
        read_chat_jsonl(path)
    assert f"{path}:2: message 1: 'function' is the legacy name of 'tool'; rename the role to 'tool'" in str(exc.value)
    assert f"{path}:5: message 0 needs a `role` in" in str(exc.value)


def test_build_keeps_tool_and_developer_and_rejects_function_with_the_fix(tmp_path: Path) -> None:
    src = _file(tmp_path)
    out = tmp_path / "out"
    build([str(src)], out, seed=0, val_fraction=0.0, test_fraction=0.0)
    kept = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    assert sorted(ex["meta"]["locator"] for ex in kept) == ["line=1", "line=3", "line=4"]
    rejects = {r["locator"]: r["reason"] for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}
    assert rejects["line=2"] == "invalid_messages: message 1 has role 'function'; rename it to 'tool'"
    assert rejects["line=5"] == "invalid_messages: message 0 has role 'robot'"
    # what the build keeps, training reads
    assert len(read_chat_jsonl(out / "train.jsonl")) == 3
