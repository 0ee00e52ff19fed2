"""Prompt builds (`task: prompts`, for method grpo): every source format gives the same prompt record,
the reference answer optional, the other columns kept (and redacted), rejects with their reasons and
lines, the split by prompt, both engines, and the output read back by finetune's prompt reader and
trained on by `method: grpo`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dp_fixtures import near_dup_triple, read_jsonl
from test_dp_preference import assert_ray_matches_local, words, write_csv, write_jsonl

from data_prep.build import build
from data_prep.cli import main
from data_prep.recipe import RecipeError, validate_recipe
from data_prep.validate import validate_file
from kitcore.prompts import normalize_prompt

SPLITS = ("train", "val", "test")
ALL_TRAIN = dict(test_fraction=0, val_fraction=0)
Q = "What does the oak desk cost?"
SYS = {"role": "system", "content": "Answer with the price only."}


def lines(out: Path, split: str = "train") -> list[dict]:
    return read_jsonl(out / f"{split}.jsonl")


def body(line: dict) -> dict:
    return {k: v for k, v in line.items() if k != "meta"}


# ---- reading --------------------------------------------------------------------------------------
def test_every_source_format_gives_the_same_prompt_record(tmp_path: Path) -> None:
    """The kit's chat records (answer as the last turn, or as a column), TRL's prompt/answer, ShareGPT,
    Alpaca, a mapped sheet (CSV, TSV, XLSX) and JSON columns: one record, the answer as the last
    assistant turn, the other columns kept by name."""
    openpyxl = pytest.importorskip("openpyxl")
    want = {"messages": [SYS, {"role": "user", "content": Q}, {"role": "assistant", "content": "$12"}],
            "difficulty": "easy"}
    turns = [SYS, {"role": "user", "content": Q}]
    rows = [
        {"messages": [*turns, {"role": "assistant", "content": "$12"}], "difficulty": "easy"},
        {"messages": turns, "answer": "$12", "difficulty": "easy"},
        {"prompt": turns, "answer": "$12", "difficulty": "easy"},
        {"conversations": [{"from": "human", "value": Q}, {"from": "gpt", "value": "$12"}], "system": SYS["content"],
         "difficulty": "easy"},
        {"instruction": Q, "output": "$12", "system": SYS["content"], "difficulty": "easy"},
        {"question": Q, "answer": "$12", "system": SYS["content"], "difficulty": "easy"},
    ]
    sources = [write_jsonl(tmp_path / f"f{i}.jsonl", [r]) for i, r in enumerate(rows)]
    header, cells = ["question", "answer", "system", "difficulty"], [[Q, "$12", SYS["content"], "easy"]]
    sources.append(write_csv(tmp_path / "s.csv", header, cells))
    tsv = tmp_path / "s.tsv"
    tsv.write_text("\t".join(header) + "\n" + "\t".join(cells[0]) + "\n", encoding="utf-8")
    sources.append(tsv)
    wb = openpyxl.Workbook()
    wb.active.append(header)
    wb.active.append(cells[0])
    wb.save(tmp_path / "s.xlsx")
    sources.append(tmp_path / "s.xlsx")
    for src in sources:
        out = tmp_path / f"out-{src.name}"
        report = build([src], out, task="prompts", **ALL_TRAIN, dedup={"exact": False})
        assert report["counts"] == {"train": 1, "val": 0, "test": 0, "rejects": 0}, src.name
        (line,) = lines(out)
        assert body(line) == want, src.name
        assert line["meta"]["source"] == str(src)
        rec = normalize_prompt(body(line))  # the schema training reads
        assert rec.messages == turns and rec.columns == {"answer": "$12", "difficulty": "easy"}


def test_the_answer_is_optional_and_every_other_column_is_kept(tmp_path: Path) -> None:
    src = write_csv(tmp_path / "q.csv", ["prompt", "answer", "tests", "points"], [
        ["Is 7 prime?", "yes", '["assert f(7)"]', "3"],
        ["Name a prime below 10.", "", "", "1"],  # no reference: a prompt without one
    ])
    js = write_jsonl(tmp_path / "q.jsonl", [
        {"prompt": "Capital of Italy?", "answer": 3, "tags": ["geo"]},  # not text: kept as a column
        {"messages": [{"role": "user", "content": "Say hi."}], "schema": {"type": "string"}},
    ])
    build([src, js], tmp_path / "out", task="prompts", **ALL_TRAIN)
    got = [body(x) for x in lines(tmp_path / "out")]
    assert got == [
        {"messages": [{"role": "user", "content": "Is 7 prime?"}, {"role": "assistant", "content": "yes"}],
         "tests": '["assert f(7)"]', "points": "3"},
        {"messages": [{"role": "user", "content": "Name a prime below 10."}], "tests": "", "points": "1"},
        {"messages": [{"role": "user", "content": "Capital of Italy?"}], "answer": 3, "tags": ["geo"]},
        {"messages": [{"role": "user", "content": "Say hi."}], "schema": {"type": "string"}},
    ]
    assert normalize_prompt(got[1]).columns == {"tests": "", "points": "1"}  # no answer


def test_tool_calling_prompts_keep_their_tools_and_reference_calls(tmp_path: Path) -> None:
    tools = [{"type": "function", "function": {"name": "price", "parameters": {"type": "object", "properties": {
        "item": {"type": "string"}}}}}]
    call = {"id": "c1", "type": "function", "function": {"name": "price", "arguments": '{"item": "desk"}'}}
    js = write_jsonl(tmp_path / "t.jsonl", [
        {"messages": [{"role": "user", "content": Q}, {"role": "assistant", "content": None, "tool_calls": [call]}],
         "tools": tools},
        {"messages": [{"role": "user", "content": "Price of the lamp?"}], "tools": tools},  # no reference call
        {"messages": [{"role": "user", "content": "Price of the rug?"},
                      {"role": "assistant", "content": None, "tool_calls": [
                          {**call, "function": {"name": "weather", "arguments": "{}"}}]}], "tools": tools},
    ])
    sheet = write_csv(tmp_path / "t.csv", ["question", "tools", "tool_calls"],
                      [["Price of the chair?", json.dumps(tools), json.dumps({"name": "price", "arguments": {
                          "item": "chair"}})]])
    report = build([js, sheet], tmp_path / "out", task="prompts", **ALL_TRAIN)
    got = [body(x) for x in lines(tmp_path / "out")]
    assert got[0] == {"messages": [{"role": "user", "content": Q},
                                   {"role": "assistant", "content": None, "tool_calls": [call]}], "tools": tools}
    assert got[1] == {"messages": [{"role": "user", "content": "Price of the lamp?"}], "tools": tools}
    assert got[2]["tools"] == tools and got[2]["messages"][-1]["tool_calls"][0]["function"] == {
        "name": "price", "arguments": '{"item": "chair"}'}
    assert normalize_prompt(got[0]).columns["tool_calls"] == [call]
    (rej,) = lines(tmp_path / "out", "rejects")
    assert rej["locator"] == "line=3" and "weather" in rej["reason"], rej  # a call to an undeclared function
    assert report["counts"]["rejects"] == 1


def test_every_bad_row_is_a_reject_with_its_reason_and_line(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "bad.jsonl", [
        "{broken",
        {"messages": [{"role": "system", "content": "s"}]},
        {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A"}], "answer": "A"},
        {"question": "Q?", "trainer_state": 1},  # a column named like one of TRL's own arguments
        {"prompt": "Q?", "meta": {"a": 1}},  # the line's provenance key
        {"question": "", "answer": "5"},
        {"question": "Tell me.", "answer": "   "},  # a blank answer is no answer
        {"text": "no prompt here"},
        {"prompt": "Fine?", "answer": "\u200b"},  # an answer that cleaning empties
    ])
    page = tmp_path / "page.html"
    page.write_text("<html><body><p>Some page text that holds no prompt.</p></body></html>", encoding="utf-8")
    report = build([src, page], tmp_path / "out", task="prompts", **ALL_TRAIN)
    rejects = {(r["source"].split("/")[-1], r["locator"]): r["reason"].split(":")[0]
               for r in lines(tmp_path / "out", "rejects")}
    assert rejects == {
        ("bad.jsonl", "line=1"): "malformed_json",
        ("bad.jsonl", "line=2"): "prompt_not_ending_with_user",
        ("bad.jsonl", "line=3"): "ambiguous_answer",
        ("bad.jsonl", "line=4"): "reserved_column",
        ("bad.jsonl", "line=5"): "reserved_column",
        ("bad.jsonl", "line=6"): "empty_user",
        ("bad.jsonl", "line=8"): "no_prompt_column",
        ("bad.jsonl", "line=9"): "empty_answer",
        ("page.html", "file"): "not_a_prompt_source",
    }, rejects
    assert [body(x) for x in lines(tmp_path / "out")] == [{"messages": [{"role": "user", "content": "Tell me."}]}]
    acc = report["accounting"]
    assert acc["balanced"] and report["counts"]["rejects"] == 9
    # without provenance a `meta` column is the user's own
    build([write_jsonl(tmp_path / "m.jsonl", [{"prompt": "Q?", "meta": {"a": 1}}])], tmp_path / "nometa",
          task="prompts", provenance=False, **ALL_TRAIN)
    assert lines(tmp_path / "nometa") == [{"messages": [{"role": "user", "content": "Q?"}], "meta": {"a": 1}}]


def test_recipe_keys_of_the_other_tasks_are_errors_naming_the_key(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q?"}])
    for columns, key, says in (({"join": "url"}, "sources.0.columns.join", "reads no pages"),
                               ({"chosen": "good"}, "sources.0.columns.chosen", "a preference column")):
        with pytest.raises(RecipeError) as err:
            validate_recipe({"sources": [{"path": str(src), "columns": columns}], "output_dir": str(tmp_path / "o"),
                             "task": "prompts"})
        assert key in str(err.value) and says in str(err.value)
    with pytest.raises(RecipeError, match="dedup.near_action"):
        validate_recipe({"sources": [{"path": str(src)}], "output_dir": str(tmp_path / "o"), "task": "prompts",
                         "dedup": {"near_action": "drop"}})


def test_pii_is_redacted_in_the_prompt_the_answer_and_the_columns(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Write to ann@example.com: what is 2+2?", "answer": "4 (ann@example.com)",
         "contacts": {"to": ["ann@example.com", 12]}, "tests": "assert reply"},
    ])
    report = build([src], tmp_path / "out", task="prompts", **ALL_TRAIN)
    (line,) = lines(tmp_path / "out")
    assert line["messages"][0]["content"] == "Write to [EMAIL]: what is 2+2?"
    assert line["messages"][1]["content"] == "4 ([EMAIL])"
    assert line["contacts"] == {"to": ["[EMAIL]", 12]} and line["tests"] == "assert reply"
    assert report["pii"]["email"] == 3


def test_duplicates_are_dropped_and_one_prompts_records_share_a_split(tmp_path: Path) -> None:
    rows = []
    for p in range(60):
        q = f"Which city is the capital of country {p}?"
        rows.append({"prompt": q, "answer": f"City {p}"})
        if p % 3 == 0:
            rows.append({"prompt": q, "answer": f"City {p}"})  # the same record again: dropped
        if p % 4 == 0:
            rows.append({"prompt": q.upper(), "answer": f"Town {p}", "alt": True})  # another reference: kept
    src = write_jsonl(tmp_path / "p.jsonl", rows)
    report = build([src], tmp_path / "out", task="prompts", test_fraction=0.3, val_fraction=0.1, seed=1)
    assert report["dedup"]["exact_duplicates"] == 20
    where: dict[str, set[str]] = {}
    for s in SPLITS:
        for ln in lines(tmp_path / "out", s):
            where.setdefault(words(ln["messages"][0]["content"]), set()).add(s)
    assert len(where) == 60 and all(len(v) == 1 for v in where.values())  # no prompt in two splits
    assert sum(report["counts"][s] for s in SPLITS) == 60 + 15
    assert all(report["counts"][s] > 0 for s in SPLITS)


# ---- what reads the output ------------------------------------------------------------------------
def test_finetune_trains_grpo_on_the_build_and_validate_reads_it(tiny_model, tmp_path: Path, capsys) -> None:
    """The build's lines (prompts with and without a reference, different columns per record) are read
    by finetune's prompt cache and `data-prep validate --task prompts`, and a grpo run trains on them:
    the prompt without a reference is counted as the exact-match reward's error, not a crash."""
    from finetune.config import load_config
    from finetune.training.recipe import train

    src = write_csv(tmp_path / "q.csv", ["question", "answer", "points"],
                    [[f"How much is item {i}?", f"${i}" if i % 2 else "", str(i)] for i in range(24)])
    assert main(["build", str(src), "-o", str(tmp_path / "out"), "--task", "prompts", "--test-fraction", "0",
                 "--val-fraction", "0"]) == 0
    assert "task prompts: prompt records" in capsys.readouterr().out
    path = tmp_path / "out" / "train.jsonl"
    assert validate_file(str(path), prompts=True).ok
    assert main(["validate", str(path), "--task", "prompts"]) == 0
    cfg = load_config(None, [
        f"model={tiny_model}", f"data.train={path}", f"output_dir={tmp_path / 'run'}", "method=grpo",
        "grpo.rewards=[{type: exact_match}, {type: 'tests.finetune.test_grpo:even_tokens'}]",
        "grpo.num_generations=2", "grpo.max_completion_length=8", "training.batch_size=8", "training.max_steps=4",
        "training.logging_steps=1", "training.report_to=[none]", "max_length=128", "seed=0"])
    run = train(cfg)
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [m for m in logged if "loss" in m]
    assert len(steps) == 4 and all("rewards/exact_match/mean" in m for m in steps), steps
    # exactly the completions of the prompts without a reference are the exact-match reward's errors,
    # whatever the other prompts of their batch (the prompts each step drew: the plan's replay)
    from finetune.data.cache import prepared_split
    from finetune.models.loading import load_tokenizer
    from finetune.plan.batches import rollout_generations

    ds, _, _ = prepared_split(cfg, load_tokenizer(str(tiny_model)), str(path))
    drawn = [int(i) for _, _, rows in rollout_generations(len(ds), batch_size=8, group=2, seed=0, micro_batches=4)
             for i in rows[0]]
    no_answer = [i for i in drawn if "answer" not in json.loads(ds[i]["columns"])]
    assert 0 < len(no_answer) < len(drawn)
    errors = json.loads((run / "run.json").read_text())["throughput"]["reward_errors"]["exact_match"]
    assert errors == {"KeyError: \"this prompt record has no 'answer'\"": len(no_answer)}, errors


def test_cli_task_flag(tmp_path: Path, capsys) -> None:
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Question {i}?"} for i in range(10)])
    assert main(["build", str(src), "-o", str(tmp_path / "out"), "--task", "prompts"]) == 0
    assert "task prompts: prompt records" in capsys.readouterr().out


# ---- the Ray engine -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def test_ray_engine_gives_the_local_engines_prompts_build(ray_session, tmp_path: Path) -> None:
    rows = []
    for p in range(40):
        q = f"Which city is the capital of country {p}?"
        rows.append({"prompt": q, "answer": f"City {p}", "n": p})
        if p % 5 == 0:
            rows.append({"prompt": q, "answer": f"City {p}", "n": p})  # exact copy
    for t in range(3):  # near-similar prompts: z like x and like y
        rows += [{"prompt": text, "n": t} for text in near_dup_triple(t)]
    sources = [write_jsonl(tmp_path / "src" / "a.jsonl", rows + ["{broken", {"text": "x"}]),
               write_csv(tmp_path / "src" / "b.csv", ["question", "answer", "mail"],
                         [["Who wrote it?", "", "bob@example.com"], ["", "x", ""]])]
    args = dict(task="prompts", test_fraction=0.3, val_fraction=0.1, seed=2)
    local = build(sources, tmp_path / "local", **args)
    assert local["dedup"]["exact_duplicates"] > 0 and local["dedup"]["near_duplicates"] > 0
    assert_ray_matches_local(sources, tmp_path, local, args)
