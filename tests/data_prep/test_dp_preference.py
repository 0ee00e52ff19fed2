"""Preference builds (`task: preference` / `task: kto`): every source format, rejects with their
reasons and line numbers, redaction of prompt, chosen and rejected, dedup, the split by prompt
(no prompt in two splits, whatever the order or sharding of the input), both engines, and the
output read back by finetune's preference reader and `data-prep validate`."""

from __future__ import annotations

import csv
import json
import random
import re
from pathlib import Path

import pytest
from dp_fixtures import near_dup_triple, read_jsonl

from data_prep.build import build, run_recipe
from data_prep.cli import main
from data_prep.preference import hh_messages
from data_prep.recipe import RecipeError, validate_recipe
from data_prep.validate import validate_file
from kitcore.preference import normalize_preference

SPLITS = ("train", "val", "test")
ALL_TRAIN = dict(test_fraction=0, val_fraction=0)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def bot(text: str) -> dict:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict:
    return {"role": "system", "content": text}


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def built(out: Path) -> dict[str, list[dict]]:
    return {s: read_jsonl(out / f"{s}.jsonl") for s in (*SPLITS, "rejects")}


def words(text: str) -> str:
    """A prompt as this test normalizes it (independently of data_prep): lowercase words."""
    return " ".join(re.findall(r"\w+", text.lower()))


def prompt_of(line: dict) -> str:
    return " | ".join(words(m["content"]) for m in line["prompt"] if m["role"] != "system")


# ---- reading --------------------------------------------------------------------------------------
def test_hh_conversation_strings_split_on_their_turn_markers() -> None:
    text = "\n\nHuman: List two steps.\nNote: be brief.\n\nAssistant: Step 1: mix.\n\nStep 2: bake.\n\nHuman: And?\n\nHuman: Hello?"
    assert hh_messages(text) == [
        user("List two steps.\nNote: be brief."),  # a label-like line stays in its turn
        bot("Step 1: mix.\n\nStep 2: bake."),
        user("And?\n\nHello?"),  # consecutive turns of one speaker are one message
    ]
    assert hh_messages("Human: hi\n\nAssistant: hello") == [user("hi"), bot("hello")]  # no leading blank line
    assert hh_messages("Customer: hi\nAgent: hello") is None
    assert hh_messages("\n\nHuman: only a question") is None


def test_every_source_format_gives_the_same_pair(tmp_path: Path) -> None:
    """The same kind of pair (question n, right and wrong answer) in every format a source may use."""

    def q(n: int) -> str:
        return f"Question {n}: what is {n} plus {n}?"

    def right(n: int) -> str:
        return f"It is {2 * n}."

    def wrong(n: int) -> str:
        return f"It is {2 * n + 1}."

    rows = [
        {"prompt": [user(q(0))], "chosen": [bot(right(0))], "rejected": [bot(wrong(0))]},  # TRL explicit
        {"prompt": q(1), "chosen": right(1), "rejected": wrong(1)},  # TRL standard (strings)
        {"chosen": [user(q(2)), bot(right(2))], "rejected": [user(q(2)), bot(wrong(2))]},  # implicit prompt
        {"chosen": f"\n\nHuman: {q(3)}\n\nAssistant: {right(3)}",  # HH-RLHF as released
         "rejected": f"\n\nHuman: {q(3)}\n\nAssistant: {wrong(3)}"},
        {"input": {"messages": [user(q(4))]}, "preferred_output": [bot(right(4))],  # OpenAI
         "non_preferred_output": [bot(wrong(4))]},
        {"prompt": f"\n\nHuman: {q(5)}\n\nAssistant:", "chosen": right(5), "rejected": wrong(5)},  # HH prompt
    ]
    jsonl = write_jsonl(tmp_path / "pairs.jsonl", rows)
    (tmp_path / "pairs.json").write_text(json.dumps({"data": [{"question": q(6), "chosen": right(6),
                                                                "rejected": wrong(6)}]}))
    sheet = write_csv(tmp_path / "sheet.csv", ["question", "chosen", "rejected"], [[q(7), right(7), wrong(7)]])
    mapped = write_csv(tmp_path / "mapped.csv", ["ask", "good", "bad", "sys"], [[q(8), right(8), wrong(8), "Be exact."]])
    openpyxl = pytest.importorskip("openpyxl")
    wb = openpyxl.Workbook()
    wb.active.append(["prompt", "chosen", "rejected"])
    wb.active.append([q(9), right(9), wrong(9)])
    wb.save(tmp_path / "book.xlsx")
    out = tmp_path / "out"
    recipe = validate_recipe({
        "task": "preference",
        "sources": [{"path": str(p)} for p in (jsonl, tmp_path / "pairs.json", sheet, tmp_path / "book.xlsx")]
        + [{"path": str(mapped), "columns": {"prompt": "ask", "chosen": "good", "rejected": "bad", "system": "sys"}}],
        "output_dir": str(out),
        "split": ALL_TRAIN,
    })
    report = run_recipe(recipe)
    lines = built(out)
    assert lines["rejects"] == [] and report["counts"]["train"] == 10 and report["accounting"]["balanced"]
    by_question = {int(re.search(r"Question (\d+)", ln["prompt"][-1]["content"]).group(1)): ln for ln in lines["train"]}
    assert sorted(by_question) == list(range(10))
    for n, line in by_question.items():
        want_prompt = [system("Be exact."), user(q(n))] if n == 8 else [user(q(n))]
        assert line["prompt"] == want_prompt, n
        assert line["chosen"] == [bot(right(n))] and line["rejected"] == [bot(wrong(n))], n
        assert normalize_preference(line).prompt == want_prompt  # the schema training reads
    assert by_question[7]["meta"] == {"source": str(sheet), "locator": "row=1"}
    assert by_question[9]["meta"]["locator"] == "sheet=Sheet,row=2"
    assert report["task"] == "preference" and list(report["steps"]) == [
        "clean", "redact", "chat_filter", "assemble", "preference", "dedup"]


def test_multi_turn_pairs_keep_the_shared_conversation_as_prompt(tmp_path: Path) -> None:
    convo = [system("Be kind."), user("Hi"), bot("Hello!"), user("Tell me a joke.")]
    src = write_jsonl(tmp_path / "p.jsonl", [
        {"chosen": [*convo, bot("Why did the chicken cross the road?")], "rejected": [*convo, bot("No.")]},
        {"prompt": "Summarise: the cat sat.", "context": "A passage about cats.", "chosen": "A cat sat.",
         "rejected": "Dogs ran."},
    ])
    build([src], tmp_path / "out", task="preference", **ALL_TRAIN)
    first, second = built(tmp_path / "out")["train"]
    assert first["prompt"] == convo and first["chosen"] == [bot("Why did the chicken cross the road?")]
    # an inline context column goes before the question, as in SFT builds
    assert second["prompt"] == [user("A passage about cats.\n\nSummarise: the cat sat.")]


def test_kto_builds_keep_unpaired_examples_and_pairs(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "kto.jsonl", [
        {"prompt": [user("Is 3 odd?")], "completion": [bot("Yes.")], "label": True},
        {"prompt": "Is 4 odd?", "completion": "Yes.", "label": False},
        {"prompt": "Is 5 odd?", "chosen": "Yes.", "rejected": "No."},
        {"prompt": "Is 6 odd?", "completion": "No.", "label": "maybe"},
    ])
    sheet = write_csv(tmp_path / "kto.csv", ["prompt", "completion", "label"],
                      [["Is 7 odd?", "Yes.", "TRUE"], ["Is 8 odd?", "Yes.", "0"], ["Is 9 odd?", "Yes.", "dunno"]])
    report = build([src, sheet], tmp_path / "kto", task="kto", **ALL_TRAIN)
    lines = built(tmp_path / "kto")
    labels = {prompt_of(ln): ln.get("label") for ln in lines["train"]}
    assert labels == {"is 3 odd": True, "is 4 odd": False, "is 5 odd": None, "is 7 odd": True, "is 8 odd": False}
    assert [(r["source"], r["locator"], r["reason"].split(":")[0]) for r in lines["rejects"]] == [
        (str(src), "line=4", "invalid_label"), (str(sheet), "row=3", "invalid_label")]
    for ln in lines["train"]:
        assert normalize_preference(ln, unpaired=True).prompt == ln["prompt"]
    assert validate_file(str(tmp_path / "kto" / "train.jsonl")).ok
    assert report["rejects_by_reason"] == {"invalid_label": 2}
    # a pair build refuses unpaired examples, saying what to build instead
    build([src], tmp_path / "pairs", task="preference", **ALL_TRAIN)
    rejects = built(tmp_path / "pairs")["rejects"]
    assert [r["locator"] for r in rejects if r["reason"].startswith("unpaired_record")] == ["line=1", "line=2", "line=4"]
    assert "task: kto" in rejects[0]["reason"]


def test_tool_calling_pairs_are_refused_by_the_build_with_their_reason(tmp_path: Path) -> None:
    """Training reads pairs with tools (kitcore.preference); the build's text steps do not carry
    them, so such a row is a reject naming why, never written without its tools."""
    weather = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}

    def call(city: str) -> list[dict]:
        return [{"role": "assistant", "content": None, "tool_calls": [{"id": "call_0", "type": "function",
                 "function": {"name": "weather", "arguments": json.dumps({"city": city})}}]}]

    src = write_jsonl(tmp_path / "pairs.jsonl", [
        {"tools": [weather], "prompt": [user("Weather in Oslo?")], "chosen": call("Oslo"), "rejected": call("Lima")},
        {"input": {"messages": [user("Weather in Pune?")], "tools": [weather]},
         "preferred_output": call("Pune"), "non_preferred_output": call("Kyiv")},
        {"prompt": "Is 5 odd?", "chosen": "Yes.", "rejected": "No."},
    ])
    report = build([src], tmp_path / "out", task="preference", **ALL_TRAIN)
    lines = built(tmp_path / "out")
    assert [prompt_of(ln) for ln in lines["train"]] == ["is 5 odd"]
    assert [(r["locator"], r["reason"].split(":")[0]) for r in lines["rejects"]] == [
        ("line=1", "tool_calling_pair"), ("line=2", "tool_calling_pair")]
    assert report["rejects_by_reason"] == {"tool_calling_pair": 2}
    assert normalize_preference(json.loads(src.read_text().splitlines()[0])).tools == [weather]


# ---- rejects --------------------------------------------------------------------------------------
def test_every_bad_pair_is_a_reject_with_its_reason_and_line(tmp_path: Path) -> None:
    good = {"prompt": "Is 1 odd?", "chosen": "Yes.", "rejected": "No."}
    src = write_jsonl(tmp_path / "p.jsonl", [
        good,
        "{broken",
        {"chosen": "\n\nHuman: A\n\nAssistant: B", "rejected": "\n\nHuman: C\n\nAssistant: D"},
        {"chosen": [user("Q"), bot("A")], "rejected": [user("Q"), bot("A")]},
        {"prompt": "Is 2 odd?", "chosen": "No.  ", "rejected": "No."},  # the same once spacing is cleaned
        {"prompt": "Mail?", "chosen": "Write to ann@example.com", "rejected": "Write to bob@example.org"},
        {"prompt": "Is 3 odd?", "chosen": "Yes.", "rejected": "   "},
        {"prompt": [user("Q"), bot("A")], "chosen": "B", "rejected": "C"},
        {"question": "Q", "answer": "A"},
        {"prompt": [system("Only a system prompt.")], "chosen": "B", "rejected": "C"},
        {"prompt": 3, "chosen": "B", "rejected": "C"},
    ])
    page = tmp_path / "page.html"
    page.write_text("<html><body><main><p>Not a pair.</p></main></body></html>")
    report = build([src, page], tmp_path / "out", task="preference", **ALL_TRAIN)
    lines = built(tmp_path / "out")
    got = [(Path(r["source"]).name, r["locator"], r["step"], r["reason"].split(":")[0]) for r in lines["rejects"]]
    assert got == [
        ("page.html", "file", "read", "not_a_preference_source"),
        ("p.jsonl", "line=2", "read", "malformed_json"),
        ("p.jsonl", "line=3", "convert", "no_shared_prompt"),
        ("p.jsonl", "line=4", "convert", "identical_pair"),
        ("p.jsonl", "line=5", "preference", "identical_pair"),
        ("p.jsonl", "line=6", "preference", "identical_pair"),  # the emails differed; [EMAIL] does not
        ("p.jsonl", "line=7", "chat_filter", "empty_assistant"),
        ("p.jsonl", "line=8", "convert", "prompt_ends_with_assistant"),
        ("p.jsonl", "line=9", "convert", "no_preference_structure"),
        ("p.jsonl", "line=10", "convert", "no_user_message"),
        ("p.jsonl", "line=11", "convert", "invalid_messages"),
    ]
    by_loc = {r["locator"]: r for r in lines["rejects"]}
    assert by_loc["line=7"]["reason"] == "empty_assistant: rejected message 0"  # named by part
    assert by_loc["line=6"]["record"]["chosen"] == [bot("Write to [EMAIL]")]  # what the record became
    assert by_loc["line=9"]["record"] == {"question": "Q", "answer": "A"}  # what the row was
    assert len(lines["train"]) == 1 and report["accounting"] == {"records_in": 12, "out": 12, "balanced": True}
    assert report["rejects_by_reason"]["identical_pair"] == 3
    assert report["steps"]["preference"] == {"in": 3, "out": 1, "dropped": {"identical_pair": 2}}


def test_recipe_keys_of_the_other_task_are_errors_naming_the_key(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q", "chosen": "A", "rejected": "B"}])
    base = {"output_dir": str(tmp_path / "o")}
    with pytest.raises(RecipeError) as err:
        validate_recipe({**base, "task": "preference", "dedup": {"near_action": "drop"}, "sources": [
            {"path": str(src), "columns": {"user": "q", "join": "page", "tools": "t", "label": "ok", "chosen": "c"}}]})
    assert [p.split(":")[0] for p in err.value.problems] == [
        "sources.0.columns.user", "sources.0.columns.join", "sources.0.columns.tools", "sources.0.columns.label",
        "dedup.near_action"]
    assert "context column" in err.value.problems[1] and "task: kto" in err.value.problems[3]
    with pytest.raises(RecipeError, match=r"sources.0.columns.chosen: a preference column; set task: preference"):
        validate_recipe({**base, "sources": [{"path": str(src), "columns": {"chosen": "c"}}]})
    assert validate_recipe({**base, "task": "kto", "sources": [{"path": str(src)}]}).dedup.near_action == "group"


# ---- redaction ------------------------------------------------------------------------------------
def test_pii_is_redacted_alike_in_prompt_chosen_and_rejected(tmp_path: Path) -> None:
    pii = "ann.lee@example.com, +44 20 7946 0958, card 4111 1111 1111 1111, host 192.168.10.7"
    src = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": [system(f"Escalate to {pii}"), user(f"My details: {pii}. Who do I call?")],
         "chosen": [bot(f"Call {pii} and quote your order."), user(f"Thanks, {pii}?"), bot(f"Yes: {pii}")],
         "rejected": [bot(f"Call {pii}. Or do not."), user(f"Thanks, {pii}?"), bot("No.")]},
    ])
    report = build([src], tmp_path / "out", task="preference", **ALL_TRAIN)
    (line,) = built(tmp_path / "out")["train"]
    text = json.dumps(line)
    for raw in ("ann.lee", "7946", "4111", "192.168"):
        assert raw not in text
    redacted = "[EMAIL], [PHONE], card [CARD], host [IP]"
    assert line["prompt"] == [system(f"Escalate to {redacted}"), user(f"My details: {redacted}. Who do I call?")]
    assert line["chosen"][0]["content"] == f"Call {redacted} and quote your order."
    assert line["rejected"][0]["content"] == f"Call {redacted}. Or do not."
    # the same text in chosen and in rejected stays the same text: the pair differs where it did
    assert line["chosen"][1] == line["rejected"][1] == user(f"Thanks, {redacted}?")
    assert report["pii"] == {"email": 7, "phone": 7, "ip": 7, "card": 7}


# ---- dedup ------------------------------------------------------------------------------------------
def test_exact_duplicates_are_dropped_other_pairs_of_a_prompt_are_kept(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [
        {"prompt": "Name a prime.", "chosen": "Seven.", "rejected": "Eight."},
        {"prompt": "Name a prime.", "chosen": "Seven.", "rejected": "Nine."},  # another judgement
        {"prompt": "Name a prime.", "chosen": "Eight.", "rejected": "Seven."},  # the opposite one
    ])
    b = write_jsonl(tmp_path / "b.jsonl", [
        {"prompt": "  NAME a prime!", "chosen": "seven", "rejected": "EIGHT"},  # case, punctuation, spacing
        {"prompt": [system("Be brief."), user("Name a prime.")], "chosen": "Seven.", "rejected": "Eight."},
        # no words at all: compared by their text, not all alike
        {"prompt": "\U0001f642", "chosen": "\U0001f44d", "rejected": "\U0001f44e"},
        {"prompt": "\U0001f642", "chosen": "\U0001f44e", "rejected": "\U0001f44d"},
        {"prompt": "\U0001f643", "chosen": "\U0001f44d", "rejected": "\U0001f44e"},
    ])
    report = build([a, b], tmp_path / "out", task="preference", **ALL_TRAIN)
    lines = built(tmp_path / "out")
    assert [ln["meta"]["locator"] for ln in lines["train"]] == ["line=1", "line=2", "line=3", "line=2", "line=3",
                                                                "line=4", "line=5"]
    (dup,) = lines["rejects"]
    assert (dup["source"], dup["locator"], dup["reason"]) == (str(b), "line=1", f"duplicate of {a}#line=1")
    assert report["dedup"]["exact_duplicates"] == 1 and report["dedup"]["clusters"] == 1
    # the worded ones ask one prompt (a system prompt does not make another): one split group
    assert report["split"]["groups"] == {"train": 3, "val": 0, "test": 0}


def near_prompt_corpus(root: Path, n_triples: int = 6) -> list[Path]:
    """Prompts x, y, z per triple (z near-similar to x and to y, x and y not), each asked in its own
    file, with other prompts around them so that the split has something to fill."""
    rows: dict[str, list[dict]] = {"a": [], "b": [], "c": []}
    for t in range(n_triples):
        for name, text in zip("abc", near_dup_triple(t)):
            rows[name].append({"prompt": text, "chosen": f"Answer {t}{name}.", "rejected": f"Wrong {t}{name}."})
    for k in range(40):
        rows["abc"[k % 3]].append({"prompt": f"Filler question number {k}?", "chosen": "Yes.", "rejected": "No."})
    return [write_jsonl(root / f"{name}.jsonl", rs) for name, rs in rows.items()]


def test_near_similar_prompts_share_a_split_and_none_is_dropped(tmp_path: Path) -> None:
    sources = near_prompt_corpus(tmp_path / "src")
    split = dict(test_fraction=0.4, val_fraction=0.2, seed=1)

    def triples(out: Path) -> list[set[str]]:
        where = {ln["chosen"][0]["content"][-3:-1]: s for s in SPLITS for ln in read_jsonl(out / f"{s}.jsonl")}
        return [{where[f"{t}{n}"] for n in "abc"} for t in range(6)]

    report = build(sources, tmp_path / "near", task="preference", **split)
    assert report["counts"]["rejects"] == 0 and report["dedup"]["near_duplicates"] >= 6
    assert all(len(s) == 1 for s in triples(tmp_path / "near"))
    assert report["leakage"]["near_dup_pairs_test_train"] == 0
    # the control: without near dedup the same prompts are split apart
    build(sources, tmp_path / "exact", task="preference", dedup={"near": False}, **split)
    assert any(len(s) > 1 for s in triples(tmp_path / "exact"))


# ---- the split ------------------------------------------------------------------------------------
def many_prompts(n: int = 80) -> list[dict]:
    """n prompts with 1-4 pairs each; some asked again with a system prompt or other spelling."""
    rows = []
    for p in range(n):
        q = f"Which city is the capital of country {p}?"
        for k in range(1 + p % 4):
            prompt = [user(q)] if k != 2 else [system("Answer briefly."), user(q.upper().replace("?", " ?"))]
            rows.append({"prompt": prompt, "chosen": [bot(f"City {p}.")], "rejected": [bot(f"Town {p}-{k}.")]})
    return rows


def prompt_splits(out: Path) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for s in SPLITS:
        for ln in read_jsonl(out / f"{s}.jsonl"):
            found.setdefault(prompt_of(ln), set()).add(s)
    return found


def test_split_by_prompt_is_leak_free_and_independent_of_order_and_sharding(tmp_path: Path) -> None:
    rows = many_prompts()
    one = write_jsonl(tmp_path / "one" / "all.jsonl", rows)
    shuffled = list(rows)
    random.Random(5).shuffle(shuffled)
    shards = [write_jsonl(tmp_path / "shards" / f"part-{i}.jsonl", shuffled[i::3]) for i in range(3)]
    split = dict(test_fraction=0.2, val_fraction=0.1, seed=7)
    report = build([one], tmp_path / "a", task="preference", **split)
    build(shards, tmp_path / "b", task="preference", **split)
    a, b = prompt_splits(tmp_path / "a"), prompt_splits(tmp_path / "b")
    assert len(a) == 80 and all(len(s) == 1 for s in a.values())  # no prompt in two splits
    assert a == b  # the same prompts in the same splits, whatever the order and the files
    assert report["split"]["groups"] == {s: sum(v == {s} for v in a.values()) for s in SPLITS}
    counts = report["counts"]
    assert counts["rejects"] == 0 and all(counts[s] > 0 for s in SPLITS)
    assert 0.1 <= counts["test"] / len(rows) <= 0.3
    # another seed, another split of the same prompts
    build([one], tmp_path / "c", task="preference", **{**split, "seed": 8})
    assert prompt_splits(tmp_path / "c") != a


# ---- what reads the output ------------------------------------------------------------------------
def test_finetune_and_validate_read_the_build(tiny_model, tmp_path: Path) -> None:
    from finetune.config import load_config
    from finetune.data.cache import prepared_split
    from finetune.models.loading import load_tokenizer

    def cfg(path: Path, method: str):
        return load_config(None, [f"model={tiny_model}", f"data.train={path}", f"output_dir={tmp_path / 'run'}",
                                  f"method={method}", "max_length=256", f"data.cache_dir={tmp_path / 'cache'}"])

    src = write_jsonl(tmp_path / "p.jsonl", [*many_prompts(30), {"prompt": "Reach me at a@b.co", "chosen": "OK.",
                                                                  "rejected": "No."}])
    report = build([src], tmp_path / "out", task="preference", test_fraction=0.2, val_fraction=0.1)
    tok = load_tokenizer(str(tiny_model))
    for s in SPLITS:
        path = tmp_path / "out" / f"{s}.jsonl"
        assert validate_file(str(path)).ok, s
        ds, stats, _ = prepared_split(cfg(path, "dpo"), tok, str(path))
        assert stats.examples == stats.kept == len(ds) == report["counts"][s] > 0, s
        assert not stats.dropped and not stats.truncated
    kto = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "Is 3 odd?", "completion": "Yes.", "label": True},
                                              {"prompt": "Is 4 odd?", "chosen": "No.", "rejected": "Yes."}])
    build([kto], tmp_path / "kto", task="kto", **ALL_TRAIN)
    path = tmp_path / "kto" / "train.jsonl"
    ds, stats, _ = prepared_split(cfg(path, "kto"), tok, str(path))
    # the unpaired example, and the pair as a desirable and an undesirable one
    assert (stats.examples, stats.kept) == (2, 3) and sorted(ds["label"]) == [False, True, True]


def test_cli_task_flag(tmp_path: Path, capsys) -> None:
    src = write_jsonl(tmp_path / "p.jsonl", many_prompts(20))
    assert main(["build", str(src), "-o", str(tmp_path / "out"), "--task", "preference"]) == 0
    out = capsys.readouterr().out
    assert "task preference: TRL conversational preference lines, split by prompt" in out
    assert main(["validate", str(tmp_path / "out" / "train.jsonl")]) == 0


# ---- the Ray engine -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def shard_lines(out: Path, name: str) -> bytes:
    manifest = json.loads((out / name / "manifest.json").read_text())
    return b"".join((out / name / s["file"]).read_bytes() for s in manifest["shards"])


def assert_ray_matches_local(sources: list[Path], tmp_path: Path, local: dict, args: dict) -> None:
    """The Ray engine with 1 and 2 workers writes the local build's lines (in tmp_path/local) byte for
    byte, in the same splits and order, and the same report."""
    for p in (1, 2):
        out = tmp_path / f"ray{p}"
        rep = build(sources, out, engine="ray", ray={"parallelism": p, "shard_records": 20}, **args)
        for name in (*SPLITS, "rejects"):
            assert shard_lines(out, name) == (tmp_path / "local" / f"{name}.jsonl").read_bytes(), (p, name)
        drop = ("outputs", "timings", "engine")
        assert {k: v for k, v in rep.items() if k not in drop} == {k: v for k, v in local.items() if k not in drop}


def test_ray_engine_gives_the_local_engines_preference_build(ray_session, tmp_path: Path) -> None:
    """Formats, every kind of reject, exact copies, near-similar prompts and prompts with several
    pairs: the same lines in the same splits and order, the same rejects and report, with 1 or 2
    workers."""
    root = tmp_path / "src"
    sources = near_prompt_corpus(root / "near")
    sources.append(write_jsonl(root / "many.jsonl", many_prompts(40) + many_prompts(3)))  # + exact copies
    sources.append(write_jsonl(root / "bad.jsonl", [
        "{broken", {"prompt": "Q", "chosen": "A", "rejected": "A "}, {"question": "Q", "answer": "A"},
        {"chosen": "\n\nHuman: A\n\nAssistant: B", "rejected": "\n\nHuman: A\n\nAssistant: C ann@example.com"},
    ]))
    sources.append(write_csv(root / "sheet.csv", ["prompt", "chosen", "rejected"], [["Q?", "Yes", ""], ["R?", "1", "2"]]))
    args = dict(task="preference", test_fraction=0.3, val_fraction=0.1, seed=2)
    local = build(sources, tmp_path / "local", **args)
    assert local["dedup"]["exact_duplicates"] > 0 and local["dedup"]["near_duplicates"] > 0
    assert set(local["rejects_by_step"]) == {"read", "convert", "chat_filter", "preference", "dedup"}
    assert all(local["counts"][s] > 0 for s in (*SPLITS, "rejects"))
    assert_ray_matches_local(sources, tmp_path, local, args)
