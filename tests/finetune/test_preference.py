"""Preference data and DPO: the record formats, the masks (the same rule as SFT's), the data cache,
the config, and DPO training that makes a model prefer the right answer (checked by `finetune eval`
and by an independent recomputation with plain transformers + peft)."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest

from finetune.data.chat_template import CHATML_TEMPLATE, encode_chat, encode_completion, render_prompt
from kitcore.preference import PreferenceError, normalize_preference, preference_problem
from tests.conftest import make_chat_examples, write_jsonl

U = {"role": "user", "content": "How much is the oak desk? The oak desk costs $12."}
S = {"role": "system", "content": "Answer with the price only."}
A_GOOD, A_BAD = {"role": "assistant", "content": "$12"}, {"role": "assistant", "content": "$40"}


def price_pairs(n: int, seed: int) -> list[dict]:
    """The quickstart's price look-up as preferences: chosen quotes the asked product's price, rejected
    another price from the same catalogue (plausible, wrong)."""
    rng = random.Random(seed)
    out = []
    for ex in make_chat_examples(n, seed):
        msgs = ex["messages"]
        k = next(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        prompt, right = msgs[:k], msgs[k]["content"]
        prices = sorted(set(re.findall(r"\$\d+", prompt[-1]["content"])) - {right})
        wrong = rng.choice(prices) if prices else f"${int(right[1:]) + 1}"
        out.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": right}],
                    "rejected": [{"role": "assistant", "content": wrong}]})
    return out


PARITY_ASKS = ["Is {n} odd or even?", "{n}: odd or even?", "Tell me whether {n} is even or odd.", "Odd or even: {n}"]


def parity_pairs(n_train: int, n_held: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Preferences whose chosen answer is derivable from the prompt: is the number odd or even
    (chosen the right word, rejected the other). Held-out numbers never occur in training."""
    rng = random.Random(seed)
    numbers = list(range(1000))
    rng.shuffle(numbers)

    def pairs(pool: list[int], n: int) -> list[dict]:
        out = []
        for i in range(n):
            k = pool[i % len(pool)]
            right, wrong = ("even", "odd") if k % 2 == 0 else ("odd", "even")
            prompt = [{"role": "user", "content": rng.choice(PARITY_ASKS).format(n=k)}]
            if i % 3 == 0:
                prompt.insert(0, {"role": "system", "content": "Answer with one word."})
            out.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": right}],
                        "rejected": [{"role": "assistant", "content": wrong}]})
        return out

    return pairs(numbers[:700], n_train), pairs(numbers[700:], n_held)


# ----------------------------------------------------------------------------------------------
# the record formats
# ----------------------------------------------------------------------------------------------
def test_the_three_pair_formats_and_strings_read_the_same():
    trl = {"prompt": [S, U], "chosen": [A_GOOD], "rejected": [A_BAD]}
    implicit = {"chosen": [S, U, A_GOOD], "rejected": [S, U, A_BAD]}
    openai = {"input": {"messages": [S, U]}, "preferred_output": [A_GOOD], "non_preferred_output": [A_BAD]}
    want = normalize_preference(trl)
    assert want.prompt == [S, U] and want.chosen == [A_GOOD] and want.rejected == [A_BAD] and want.paired
    assert normalize_preference(implicit) == want == normalize_preference(openai)
    strings = normalize_preference({"prompt": U["content"], "chosen": "$12", "rejected": "$40"})
    assert strings.prompt == [U] and strings.chosen == [A_GOOD] and strings.rejected == [A_BAD]


def test_unpaired_records_for_kto():
    rec = normalize_preference({"prompt": [U], "completion": [A_GOOD], "label": True}, unpaired=True)
    assert not rec.paired and rec.label is True and rec.chosen == [A_GOOD]
    assert "label" in preference_problem({"prompt": [U], "completion": [A_GOOD], "label": "yes"}, unpaired=True)


@pytest.mark.parametrize("record, words", [
    ({"prompt": [U], "chosen": [A_GOOD], "rejected": [A_GOOD]}, "identical"),
    ({"prompt": [U, A_GOOD], "chosen": [A_GOOD], "rejected": [A_BAD]}, "ends with an assistant message"),
    ({"prompt": [U], "chosen": [U, A_GOOD], "rejected": [A_BAD]}, "must start with an assistant message"),
    ({"prompt": [U], "chosen": [{"role": "assistant"}], "rejected": [A_BAD]}, "`chosen`"),
    ({"prompt": [U], "chosen": [], "rejected": [A_BAD]}, "non-empty list"),
    ({"chosen": [U, A_GOOD], "rejected": [S, A_BAD]}, "share no prompt"),
    ({"messages": [U, A_GOOD]}, "not a preference record"),
    ({"input": [U], "preferred_output": [A_GOOD], "non_preferred_output": [A_BAD]}, "`input` must be an object"),
])
def test_bad_records_say_what_is_wrong(record, words):
    with pytest.raises(PreferenceError, match=re.escape(words)):
        normalize_preference(record)


# ----------------------------------------------------------------------------------------------
# masks: the same rule as SFT
# ----------------------------------------------------------------------------------------------
def test_the_scored_completion_is_what_sft_trains_for_that_turn(tiny_model):
    from finetune.models.loading import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    for prompt in ([U], [S, U], [S, U, A_BAD, {"role": "user", "content": "Sure?"}]):
        enc = encode_completion(tok, prompt, [A_GOOD])
        sft = encode_chat(tok, prompt + [A_GOOD], loss_on="last_assistant")
        trained = [t for t, lab in zip(sft.input_ids, sft.labels) if lab != -100]
        assert enc.completion_ids == trained  # the answer and its end-of-turn token, nothing after
        assert tok.decode(enc.completion_ids) == "$12<|im_end|>"
        assert enc.prompt_ids + enc.completion_ids == sft.input_ids[:len(enc.prompt_ids) + len(trained)]
        assert tok.decode(enc.prompt_ids) == render_prompt(tok, prompt)


# ----------------------------------------------------------------------------------------------
# the data cache
# ----------------------------------------------------------------------------------------------
def _cfg(tiny_model, train, tmp_path, *extra):
    from finetune.config import load_config

    return load_config(None, [f"model={tiny_model}", f"data.train={train}", f"output_dir={tmp_path / 'run'}",
                              "method=dpo", "max_length=128", *extra])


def test_the_cache_holds_prompt_chosen_and_rejected_ids(tiny_model, tmp_path):
    from finetune.data.cache import prepared_split
    from finetune.models.loading import load_tokenizer

    rows = price_pairs(20, 0)
    train = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = _cfg(tiny_model, train, tmp_path)
    tok = load_tokenizer(str(tiny_model))
    ds, stats, _ = prepared_split(cfg, tok, str(train))
    assert stats.examples == stats.kept == len(ds) == 20
    first = ds[0]
    want_c = encode_completion(tok, rows[0]["prompt"], rows[0]["chosen"])
    want_r = encode_completion(tok, rows[0]["prompt"], rows[0]["rejected"])
    assert first["prompt_ids"] == want_c.prompt_ids == want_r.prompt_ids
    assert first["chosen_ids"] == want_c.completion_ids and first["rejected_ids"] == want_r.completion_ids
    assert first["length"] == len(first["prompt_ids"]) + max(len(first["chosen_ids"]), len(first["rejected_ids"]))
    assert stats.trained_tokens == sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in ds)


def test_the_cache_equals_encode_completion_and_names_the_line_a_template_cannot_split(tiny_model, tmp_path):
    """Past the first write batch too, for pairs (DPO) and pairs read as unpaired examples (KTO), the
    cached ids are encode_completion's; a record whose prompt the template does not render as a
    prefix of the whole conversation stops the build with its line."""
    from finetune.data.cache import ENCODE_BATCH, prepared_split
    from finetune.data.files import DataError
    from finetune.models.loading import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    rows = price_pairs(ENCODE_BATCH + 20, 4)
    train = write_jsonl(tmp_path / "pairs.jsonl", rows)
    for method in ("dpo", "kto"):
        ds, stats, _ = prepared_split(_cfg(tiny_model, train, tmp_path, f"method={method}"), tok, str(train))
        assert stats.kept == len(ds) == len(rows) * (2 if method == "kto" else 1)
        for i in (0, ENCODE_BATCH + 5):
            got = ds[i * 2 if method == "kto" else i]
            want = encode_completion(tok, rows[i]["prompt"], rows[i]["chosen"])
            assert got["prompt_ids"] == want.prompt_ids
            assert got["chosen_ids" if method == "dpo" else "completion_ids"] == want.completion_ids
    # A template whose generation prompt the whole conversation does not start with, for one record
    # only (its user turn says BREAK).
    tok.chat_template = ("{% if add_generation_prompt and 'BREAK' in messages[-1]['content'] %}!{% endif %}"
                         + CHATML_TEMPLATE)
    broken = rows[ENCODE_BATCH + 7]
    broken["prompt"] = [{"role": "user", "content": "BREAK " + broken["prompt"][-1]["content"]}]
    train = write_jsonl(tmp_path / "broken.jsonl", rows)
    with pytest.raises(DataError, match=f"{train}:{ENCODE_BATCH + 8}: the chat template does not render the prompt"):
        prepared_split(_cfg(tiny_model, train, tmp_path), tok, str(train))


WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}


def _call(city: str, name: str = "weather") -> list[dict]:
    return [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_0", "type": "function", "function": {"name": name, "arguments": json.dumps({"city": city})}}]}]


def tool_pairs(n: int) -> list[dict]:
    """Preference pairs over tool calls: the right city chosen, another one rejected."""
    cities = ["Oslo", "Lima", "Pune", "Kyiv", "Accra", "Quito"]
    return [{"tools": [WEATHER], "prompt": [{"role": "user", "content": f"Weather in {cities[i % 6]}?"}],
             "chosen": _call(cities[i % 6]), "rejected": _call(cities[(i + 1) % 6])} for i in range(n)]


def test_preference_records_with_tools_are_read_checked_and_cached_with_the_tools_rendered(tiny_model, tmp_path):
    """A pair may declare `tools` (top level, or OpenAI's `input.tools`) and its completions be calls:
    each side is checked as a chat record with those tools, the cache holds the ids of prompt and
    calls rendered with the tools block (encode_completion with the tools), and DPO trains on them."""
    from data_prep.validate import validate_file
    from finetune.config import load_config
    from finetune.data.cache import prepared_split
    from finetune.data.files import DataError
    from finetune.data.preview import preview_examples
    from finetune.eval.evaluation import evaluate
    from finetune.models.loading import load_tokenizer
    from finetune.training.recipe import train

    pair = tool_pairs(1)[0]
    pref = normalize_preference(pair)
    assert pref.tools == [WEATHER] and pref.chosen == _call("Oslo") and pref.rejected == _call("Lima")
    openai = {"input": {"messages": pair["prompt"], "tools": [WEATHER]}, "preferred_output": pair["chosen"],
              "non_preferred_output": pair["rejected"]}
    assert normalize_preference(openai) == pref
    with pytest.raises(PreferenceError, match="`rejected` after the prompt's 1 message") as e:
        normalize_preference({**pair, "rejected": _call("Lima", name="stocks")})
    assert e.value.kind == "undeclared_function"
    # without its tools a call is refused as before (nothing declares the function)
    assert preference_problem({k: v for k, v in pair.items() if k != "tools"}) is not None

    # A tiny model whose tokenizer saw these tool chats as the template renders them, so that the
    # tools block is a few tokens (as in a real vocabulary), not ~500 characters' worth.
    from finetune.tiny import build_tiny_model

    rows = tool_pairs(12)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"tools": r["tools"], "messages": r["prompt"] + r[side]}
                                                     for r in rows for side in ("chosen", "rejected")])
    tiny_model = build_tiny_model(tmp_path / "tool-model", [corpus], vocab_size=400, hidden_size=64, layers=2, heads=4,
                                  kv_heads=2, max_positions=1024)
    tok = load_tokenizer(str(tiny_model))
    train_path = write_jsonl(tmp_path / "tools.jsonl", rows)
    ds, stats, _ = prepared_split(_cfg(tiny_model, train_path, tmp_path, "max_length=1024"), tok, str(train_path))
    assert stats.kept == len(ds) == 12 and stats.truncated == 0
    want_c = encode_completion(tok, rows[3]["prompt"], rows[3]["chosen"], rows[3]["tools"])
    want_r = encode_completion(tok, rows[3]["prompt"], rows[3]["rejected"], rows[3]["tools"])
    assert ds[3]["prompt_ids"] == want_c.prompt_ids and ds[3]["chosen_ids"] == want_c.completion_ids
    assert ds[3]["rejected_ids"] == want_r.completion_ids
    assert "weather" in tok.decode(ds[3]["prompt_ids"])  # the tools block is in the prompt
    assert '"Kyiv"' in tok.decode(ds[3]["chosen_ids"]) and '"Accra"' in tok.decode(ds[3]["rejected_ids"])
    run = tmp_path / "run"
    train(load_config(None, [f"model={tiny_model}", f"data.train={train_path}", f"output_dir={run}", "method=dpo",
                             "max_length=1024", "training.batch_size=4", "training.max_steps=2",
                             "training.logging_steps=1", "training.report_to=[none]", "lora.dropout=0"]))
    first = next(r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    # eval scores the same tokens; preview shows the calls as the trained tokens; validate agrees
    report = evaluate(data=train_path, adapter=run / "adapter", output=tmp_path / "eval", distributed=False)
    assert report["models"]["tuned"]["preference"]["n"] == 12
    (row,) = [r for r in map(json.loads, (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines())
              if r["model"] == "base" and r["line"] == 4]
    assert row["chosen_tokens"] == len(want_c.completion_ids) and row["rejected_tokens"] == len(want_r.completion_ids)
    shown = preview_examples(_cfg(tiny_model, train_path, tmp_path, "max_length=1024"), n=1)
    trained = ["".join(t["text"] for t in e["tokens"] if t["trained"]) for e in shown]
    assert trained == ['<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>',
                       '<tool_call>\n{"name": "weather", "arguments": {"city": "Lima"}}\n</tool_call><|im_end|>']
    assert validate_file(str(train_path)).ok
    # a template that cannot render tools is refused for such pairs, naming the line
    tok.chat_template = CHATML_TEMPLATE
    with pytest.raises(DataError, match=f"{train_path}:1: .*cannot render it"):
        prepared_split(_cfg(tiny_model, train_path, tmp_path, "max_length=1024"), tok, str(train_path))


def test_bad_preference_lines_are_all_named_with_their_line_numbers(tiny_model, tmp_path):
    from finetune.data.cache import prepared_split
    from finetune.data.files import DataError
    from finetune.models.loading import load_tokenizer

    rows = price_pairs(6, 0)
    rows[1] = {"prompt": [U], "chosen": [A_GOOD], "rejected": [A_GOOD]}
    rows[4] = {"messages": [U, A_GOOD]}
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, rows)
    with path.open("a") as fh:
        fh.write("{not json\n")
    with pytest.raises(DataError) as e:
        prepared_split(_cfg(tiny_model, path, tmp_path), load_tokenizer(str(tiny_model)), str(path))
    msg = str(e.value)
    assert "3 bad line(s)" in msg and f"{path}:2: `chosen` and `rejected` are identical" in msg
    assert f"{path}:5: not a preference record" in msg and f"{path}:7: malformed JSON" in msg


def test_pairs_too_long_are_cut_or_dropped_as_configured(tiny_model, tmp_path):
    from finetune.data.cache import prepared_split
    from finetune.models.loading import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    long_answer = {"role": "assistant", "content": "The price is " + "very " * 60 + "high."}
    rows = [{"prompt": [U], "chosen": [long_answer], "rejected": [A_BAD]},
            {"prompt": [{"role": "user", "content": "word " * 200}], "chosen": [A_GOOD], "rejected": [A_BAD]},
            {"prompt": [U], "chosen": [A_GOOD], "rejected": [A_BAD]}]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    ds, stats, _ = prepared_split(_cfg(tiny_model, path, tmp_path, "max_length=64"), tok, str(path))
    assert stats.kept == 2 and stats.truncated == 1 and dict(stats.dropped) == {"prompt_too_long": 1}
    assert max(ds["length"]) <= 64
    ds, stats, _ = prepared_split(_cfg(tiny_model, path, tmp_path, "max_length=64", "data.too_long=drop"), tok,
                                  str(path))
    assert stats.kept == 1 and dict(stats.dropped) == {"too_long": 2}


# ----------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------
def test_method_keys_are_checked_before_anything_loads(tiny_model, chat_data, tmp_path):
    from finetune.config import ConfigError, load_config

    base = [f"model={tiny_model}", f"data.train={chat_data['train']}", f"output_dir={tmp_path}"]
    with pytest.raises(ConfigError) as e:
        load_config(None, [*base, "dpo.beta=0.2", f"init_adapter={tmp_path}"])
    msg = str(e.value)
    assert "dpo: set, but method is 'sft'" in msg and "init_adapter: no adapter_config.json" in msg
    with pytest.raises(ConfigError) as e:
        load_config(None, [*base, "method=dpo", "packing=true", "dpo.loss_type=[sigmoid,sigmod]"])
    msg = str(e.value)
    assert "packing: not supported with method 'dpo'" in msg and "dpo.loss_type: unknown DPO loss 'sigmod'" in msg
    with pytest.raises(ConfigError, match="method"):
        load_config(None, [*base, "method=rlhf"])
    # a saved SFT config (every key, defaults included, as in a run's config.yaml) loads again
    from finetune.config import dump_config

    saved = tmp_path / "config.yaml"
    saved.write_text(dump_config(load_config(None, base)))
    assert load_config(saved).method == "sft"


def test_the_private_trl_hook_the_kit_overrides_is_guarded():
    import subprocess
    import sys

    import finetune.methods.preference as pref

    assert "_prepare_dataset" in vars(pref.KitDPOTrainer)
    # A TRL whose hook takes other arguments: importing the kit's trainer fails, naming the hook,
    # instead of the override silently never being called.
    code = ("from trl import DPOTrainer\nDPOTrainer._prepare_dataset = lambda self, dataset: dataset\n"
            "import finetune.methods.preference")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "ImportError" in out.stderr and "_prepare_dataset now takes" in out.stderr, \
        out.stderr[-2000:]


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------
def _independent_logps(base_dir: Path, adapter: Path, rows: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """(log p(chosen), log p(rejected)) per pair under base and base + adapter, recomputed with plain
    transformers + peft: full logits, the adapter's tokenizer and its own chat template, the
    completion = the tokens after the rendered prompt up to the end-of-turn token."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(adapter)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), adapter)
    model.eval()

    def logp(prompt, completion) -> float:
        p = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(prompt + completion, tokenize=False).rstrip()
        ids = tok(full, add_special_tokens=False)["input_ids"]
        n = len(tok(p, add_special_tokens=False)["input_ids"])
        x = torch.tensor([ids])
        with torch.no_grad():
            lp = torch.log_softmax(model(x).logits[0, :-1].float(), -1)
        return float(lp[torch.arange(n - 1, len(ids) - 1), x[0, n:]].sum())

    def score() -> list[tuple[float, float]]:
        return [(logp(r["prompt"], r["chosen"]), logp(r["prompt"], r["rejected"])) for r in rows]

    with model.disable_adapter():
        base = score()
    return {"base": base, "tuned": score()}


@pytest.mark.slow
def test_dpo_with_lora_makes_the_model_prefer_the_right_answer(tiny_model, tmp_path):
    from finetune.config import load_config
    from finetune.eval.evaluation import evaluate
    from finetune.training.recipe import train

    train_rows, held_out = parity_pairs(480, 60)
    train_path = write_jsonl(tmp_path / "train.jsonl", train_rows)
    eval_path = write_jsonl(tmp_path / "eval.jsonl", held_out)
    run = tmp_path / "run"
    train(load_config(None, [
        f"model={tiny_model}", f"data.train={train_path}", f"output_dir={run}", "method=dpo", "dpo.beta=0.2",
        "max_length=128", "training.epochs=4", "training.batch_size=8", "training.learning_rate=2e-3",
        "training.report_to=[none]", "lora.r=16", "lora.dropout=0", "seed=0"]))
    adapter = run / "adapter"
    assert not (adapter / "ref").exists()  # the frozen reference copy is not exported
    assert json.loads((adapter / "finetune.json").read_text())["method"] == "dpo"
    report = evaluate(data=eval_path, adapter=adapter, output=tmp_path / "eval", distributed=False)
    base, tuned = report["models"]["base"]["preference"], report["models"]["tuned"]["preference"]
    assert abs(base["preference_accuracy"] - 0.5) <= 0.15, base
    assert tuned["preference_accuracy"] >= 0.9, tuned
    assert tuned["reward_margin"] > 0 and tuned["reward_accuracy"] >= 0.9, tuned
    # the same log-probabilities, pair by pair, from plain transformers + peft
    rows = [json.loads(x) for x in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    independent = _independent_logps(tiny_model, adapter, held_out)
    for label in ("base", "tuned"):
        kit = [x for r in rows if r["model"] == label for x in (r["logp_chosen"], r["logp_rejected"])]
        assert kit == pytest.approx([x for pair in independent[label] for x in pair], abs=1e-3), label
        acc = sum(c > r for c, r in independent[label]) / len(held_out)
        assert acc == report["models"][label]["preference"]["preference_accuracy"], label


def test_eval_scores_unpaired_kto_records_next_to_pairs(tiny_model, tmp_path):
    """`finetune eval` on a file with pairs and unpaired (KTO) records: the pairs' scores as before, and
    for the unpaired ones the desirable-minus-undesirable log p per token and KTO's implicit reward
    accuracy of the tuned model against the base, equal to plain transformers + peft."""
    from transformers import AutoTokenizer

    from finetune.eval.evaluation import evaluate
    from finetune.tiny import build_random_adapter

    adapter = build_random_adapter(tiny_model, tmp_path / "adapter", std=0.2, seed=3)
    pairs = price_pairs(6, 7)
    unpaired = [{"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
                for p in pairs[2:] for side in ("chosen", "rejected")]
    data = write_jsonl(tmp_path / "mixed.jsonl", pairs[:2] + unpaired + [{"prompt": "x", "completion": "y"}])
    report = evaluate(data=data, adapter=adapter, output=tmp_path / "eval", distributed=False)
    assert report["meta"]["data"]["skipped"], report["meta"]["data"]  # the label-less line, with its reason
    independent = _independent_logps(tiny_model, adapter, pairs)
    tok = AutoTokenizer.from_pretrained(adapter)

    def n_tokens(prompt, completion) -> int:
        return len(encode_completion(tok, prompt, completion).completion_ids)

    per_tok = {m: [] for m in ("base", "tuned")}
    for m in per_tok:
        for p, (c, r) in zip(pairs[2:], independent[m][2:]):
            per_tok[m].append((c / n_tokens(p["prompt"], p["chosen"]), r / n_tokens(p["prompt"], p["rejected"])))
    for m in ("base", "tuned"):
        scores = report["models"][m]["preference"]
        assert scores["n"] == 2 and scores["n_desirable"] == scores["n_undesirable"] == 4, scores
        pair_acc = sum(c > r for c, r in independent[m][:2]) / 2
        assert scores["preference_accuracy"] == pair_acc
        margin = sum(c for c, _ in per_tok[m]) / 4 - sum(r for _, r in per_tok[m]) / 4
        assert scores["unpaired_logp_margin_per_token"] == pytest.approx(margin, abs=1e-4), (m, scores)
    rewards = [(t[0] - b[0], t[1] - b[1]) for t, b in zip(independent["tuned"][2:], independent["base"][2:])]
    tuned = report["models"]["tuned"]["preference"]
    assert tuned["kto_reward_accuracy"] == sum((c > 0) + (r < 0) for c, r in rewards) / 8
    expected_margin = sum(c for c, _ in rewards) / 4 - sum(r for _, r in rewards) / 4
    assert tuned["kto_reward_margin"] == pytest.approx(expected_margin, abs=1e-3)
    assert 0 < tuned["kto_reward_accuracy"] < 1, tuned  # this adapter raises some completions, lowers others
    assert "kto_reward_accuracy" in (tmp_path / "eval" / "report.md").read_text()


def test_preview_and_validate_read_preference_files_as_training_does(tiny_model, tmp_path):
    from data_prep.validate import validate_file
    from finetune.data.preview import preview_examples

    rows = [{"prompt": [U], "chosen": [A_GOOD], "rejected": [A_BAD]},
            {"prompt": [U], "chosen": [A_GOOD], "rejected": [A_GOOD]},
            {"chosen": [S, U, A_GOOD], "rejected": [S, U, A_BAD]}]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    shown = preview_examples(_cfg(tiny_model, path, tmp_path), n=1)
    assert [e["side"] for e in shown] == ["chosen", "rejected"]
    assert ["".join(t["text"] for t in e["tokens"] if t["trained"]) for e in shown] == ["$12<|im_end|>",
                                                                                       "$40<|im_end|>"]
    res = validate_file(str(path))
    assert [(e.line, e.kind) for e in res.errors] == [(2, "preference_record")]
    assert "identical" in res.errors[0].detail and res.examples == 3


def test_plan_counts_the_pair_forward_and_the_reference():
    from dataclasses import replace

    from finetune.plan.memory import ModelShape, Setup, activation_bytes, make_plan

    shape = ModelShape(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=128, vocab_size=128256)
    sft = Setup(adapter="lora", micro_batch=2, seq_len=2048, precision="bf16", weight_dtype="bfloat16")
    dpo = replace(sft, method="dpo")
    # chosen and rejected go through the model together: the activations of twice the sequences
    assert activation_bytes(shape, dpo)["layers"] == activation_bytes(shape, replace(sft, micro_batch=4))["layers"]
    names = lambda s: {x.name: x.device for x in make_plan(shape, s, alternatives=False).lines}  # noqa: E731
    lora = names(dpo)
    assert lora["reference adapter (DPO, frozen)"] == lora["trainable params (adapters)"]  # no second base
    assert "reference model (DPO, frozen)" not in lora
    full = names(replace(dpo, adapter="full"))
    assert full["reference model (DPO, frozen)"] == full["weights (trainable)"]  # a 16-bit copy beside it
    assert "reference model (DPO, frozen)" not in names(replace(dpo, adapter="full", precompute_ref=True))
    z3 = names(replace(dpo, adapter="full", zero_stage=3, gpus_per_node=8))
    assert z3["reference model (DPO, frozen)"] == full["reference model (DPO, frozen)"] / 8  # partitioned


def test_plan_counts_trls_fused_head_for_the_preference_methods():
    """DPO, KTO, ORPO and SimPO score tokens through TRL's fused LM head, not the kit's chunked loss:
    the plan counts its tiles (every position on CPU, where its torch fallback holds 8.3 fp32 tiles in
    backward; the trained positions only and one tile in the compute dtype with Triton), never Liger's
    fused cross-entropy (which the kit does not turn on for them). scripts/validate_plan.py --varied
    measures it (DPO was 26% under the measured peak while the kit's loss was counted)."""
    from dataclasses import replace

    from trl.kernels import chunked_logprob
    from trl.trainer import utils as trl_utils

    from finetune import methods
    from finetune.plan.memory import (
        TRL_HEAD_TILES_CPU,
        TRL_HEAD_TOKEN_TILE,
        TRL_HEAD_VOCAB_TILE,
        ModelShape,
        Setup,
        activation_bytes,
        make_plan,
    )

    assert (TRL_HEAD_TOKEN_TILE, TRL_HEAD_VOCAB_TILE) == (chunked_logprob.TOKEN_CHUNK_SIZE,
                                                          trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE)
    assert {m.name for m in methods.methods() if m.fused_lm_head} == {"dpo", "kto", "orpo", "simpo", "grpo"}
    shape = ModelShape(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                       num_key_value_heads=4, head_dim=64, vocab_size=32000)
    cpu = Setup(adapter="lora", micro_batch=2, seq_len=512, precision="fp32", weight_dtype="float32", device="cpu",
                method="dpo")
    positions = 4 * 511  # chosen + rejected of 2 pairs, next-token targets
    tile = min(positions, 4096) * 32000
    head = activation_bytes(shape, cpu)["head"]
    assert head == pytest.approx(positions * (8 * 768 + 28) + 4 * TRL_HEAD_TILES_CPU * tile)
    sft_head = activation_bytes(shape, replace(cpu, method="sft", micro_batch=4))["head"]
    assert head > 2 * sft_head  # the kit's chunked loss holds about 3 of those tiles
    # On a GPU only the trained positions are projected, in tiles of the compute dtype.
    gpu = replace(cpu, device="gpu", precision="bf16", weight_dtype="bfloat16", trained_fraction=0.25)
    assert activation_bytes(shape, gpu)["head"] == pytest.approx(positions // 4 * (6 * 768 + 28) + 2 * 511 * 32000)
    liger = replace(gpu, kernels="liger")
    assert not liger.liger_fused_loss and replace(liger, method="sft").liger_fused_loss
    assert activation_bytes(shape, liger)["head"] == activation_bytes(shape, gpu)["head"]
    line = {x.name: x.note for x in make_plan(shape, cpu, alternatives=False).lines}["activations: logits + loss"]
    assert "TRL's fused LM head" in line and "every position" in line


def _dpo_config(tmp_path, tiny_model, **extra):
    from tests.finetune.test_distributed import _write_config

    pairs = write_jsonl(tmp_path / "pairs.jsonl", price_pairs(96, 0))
    return _write_config(tmp_path, tiny_model, {"train": pairs}, method="dpo", dpo={"beta": 0.5}, **extra)


def _dpo_trained(run: Path, steps: int) -> list[dict]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    logged = [r for r in rows if "loss" in r]
    assert len(logged) == steps and all("rewards/margins" in r for r in logged), rows
    # The policy moved away from its reference (were the reference the policy itself, every reward and
    # margin would be exactly 0); the first step starts from it (loss ln 2).
    assert logged[0]["loss"] == pytest.approx(0.6931, abs=1e-3), logged
    assert any(abs(r["rewards/margins"]) > 1e-4 for r in logged[1:]), logged
    return logged


def _zero3_on_two_ranks(config: Path, run: Path, method: str) -> None:
    """Launch the run under ZeRO-3 on 2 processes: 2 ranks, ZeRO stage 3, different examples per rank."""
    from tests.finetune.test_distributed import _probes, _run_ok, _show

    res = _run_ok("deepspeed_zero3.yaml", config)
    assert json.loads((run / "run.json").read_text())["world_size"] == 2, _show(res)
    assert "ZeRO stage 3" in res.stdout, _show(res)
    p0, p1 = _probes(run)
    seen0 = {h for b in p0["batches"] for h in b}
    seen1 = {h for b in p1["batches"] for h in b}
    assert seen0 and seen1 and not seen0 & seen1, f"{method}: ranks saw the same examples"


@pytest.mark.distributed
@pytest.mark.slow
def test_dpo_with_lora_under_zero3_on_two_processes(tiny_model, tmp_path):
    pytest.importorskip("deepspeed")
    from tests.finetune.test_distributed import MAX_STEPS, _check_adapter

    config, run = _dpo_config(tmp_path, tiny_model)
    _zero3_on_two_ranks(config, run, "dpo")
    _dpo_trained(run, MAX_STEPS)
    _check_adapter(run, tiny_model)  # full-size LoRA weights (gathered from the shards), plain-PEFT loadable


@pytest.mark.slow
def test_qlora_dpo_trains_and_exports_a_plain_peft_adapter(tiny_model, tmp_path):
    pytest.importorskip("bitsandbytes")
    from finetune.config import load_config
    from finetune.training.recipe import train
    from tests.finetune.test_distributed import _check_adapter

    config, run = _dpo_config(tmp_path, tiny_model, adapter="qlora")
    train(load_config(config, ["training.max_steps=4"]))
    _dpo_trained(run, 4)
    _check_adapter(run, tiny_model)
    assert json.loads((run / "adapter" / "finetune.json").read_text())["adapter"] == "qlora"


@pytest.mark.slow
def test_full_fine_tuning_dpo_precomputed_reference_equals_a_reference_model(tiny_model, tmp_path):
    """Full fine-tuning: the reference is a second model loaded from the same path, or its log-probs
    computed once before training (dpo.precompute_ref_log_probs): the losses are the same."""
    from finetune.config import load_config
    from finetune.training.recipe import train

    pairs = write_jsonl(tmp_path / "pairs.jsonl", price_pairs(48, 0))
    losses = {}
    for pre in (False, True):
        run = tmp_path / f"run-{pre}"
        train(load_config(None, [f"model={tiny_model}", f"data.train={pairs}", f"output_dir={run}", "method=dpo",
                                 "adapter=full", f"dpo.precompute_ref_log_probs={str(pre).lower()}", "max_length=256",
                                 "training.max_steps=3", "training.batch_size=4", "training.logging_steps=1",
                                 "training.report_to=[none]", "seed=0"]))
        losses[pre] = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                       if "loss" in r]
        assert (run / "model" / "config.json").is_file()
    assert len(losses[True]) == 3 and losses[True] == pytest.approx(losses[False], abs=1e-5), losses
    assert losses[True][-1] != pytest.approx(0.6931, abs=1e-4)  # the third step's policy differs from the reference
    # The precomputed log-probs are stored with the data cache (TRL writes them beside the cached
    # Arrow data, keyed by the data's and the reference model's fingerprints) and read back by the
    # next run with the same data and reference instead of being computed again.
    cache = tmp_path / ".finetune-cache"
    stored = sorted(cache.rglob("cache-*.arrow"))
    assert stored, sorted(p.name for p in cache.rglob("*"))
    before = {p: p.stat().st_mtime_ns for p in stored}
    import finetune.methods.preference as pref

    calls = []
    original = pref.KitDPOTrainer.compute_ref_log_probs
    pref.KitDPOTrainer.compute_ref_log_probs = lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    try:
        train(load_config(None, [f"model={tiny_model}", f"data.train={pairs}", f"output_dir={tmp_path / 'again'}",
                                 "method=dpo", "adapter=full", "dpo.precompute_ref_log_probs=true", "max_length=256",
                                 "training.max_steps=1", "training.batch_size=4", "training.report_to=[none]",
                                 "seed=0"]))
    finally:
        pref.KitDPOTrainer.compute_ref_log_probs = original
    assert calls == [] and {p: p.stat().st_mtime_ns for p in sorted(cache.rglob("cache-*.arrow"))} == before


# ----------------------------------------------------------------------------------------------
# ORPO, SimPO (reference-free) and KTO (unpaired)
# ----------------------------------------------------------------------------------------------
def _first_step(tiny_model, tmp_path, rows, method, *extra, name: str = ""):
    """Train one step on exactly one batch of these rows; the logged first-step record (its loss
    comes from the forward pass before the update, on the untouched base: a fresh adapter is 0)."""
    from finetune.config import load_config
    from finetune.training.recipe import train

    path = write_jsonl(tmp_path / f"{method}{name}.jsonl", rows)
    run = tmp_path / f"run-{method}{name}"
    train(load_config(None, [f"model={tiny_model}", f"data.train={path}", f"output_dir={run}", f"method={method}",
                             "max_length=128", f"training.batch_size={len(rows)}", "training.max_steps=1",
                             "training.logging_steps=1", "training.report_to=[none]", "lora.dropout=0", "seed=0",
                             *extra]))
    return next(r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r)


def _hand_completion_logps(tiny_model, rows):
    """Per pair: (sum, count) of log p over the chosen and the rejected completion tokens, from full
    logits of the plain base model; the completion as the kit's chat template splits it."""
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.models.loading import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    out = []
    for r in rows:
        pair = []
        for side in ("chosen", "rejected"):
            enc = encode_completion(tok, r["prompt"], r[side])
            ids = torch.tensor([enc.prompt_ids + enc.completion_ids])
            with torch.no_grad():
                lp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            n = len(enc.prompt_ids)
            tokens = lp[torch.arange(n - 1, ids.size(1) - 1), ids[0, n:]]
            pair.append((float(tokens.sum()), len(enc.completion_ids)))
        out.append(pair)
    return out


def test_orpo_and_simpo_losses_equal_a_hand_computation_on_the_completion_tokens(tiny_model, tmp_path):
    import math

    rows = price_pairs(6, 3)
    hand = _hand_completion_logps(tiny_model, rows)
    avg = [(c / nc, r / nr) for (c, nc), (r, nr) in hand]
    nll = -sum(c for (c, _), _ in hand) / sum(n for (_, n), _ in hand)  # chosen completion tokens only
    logsig = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
    log1mexp = lambda x: math.log(-math.expm1(x))  # noqa: E731  log(1 - e^x), x < 0

    orpo = _first_step(tiny_model, tmp_path, rows, "orpo", "orpo.beta=0.25")
    odds = [(c - r) - (log1mexp(c) - log1mexp(r)) for c, r in avg]
    expected = nll - 0.25 * sum(logsig(o) for o in odds) / len(odds)
    assert orpo["loss"] == pytest.approx(expected, rel=1e-4), orpo
    assert orpo["nll_loss"] == pytest.approx(nll, rel=1e-4)  # the prompt is not trained
    assert orpo["log_odds_ratio"] == pytest.approx(sum(logsig(o) for o in odds) / len(odds), rel=1e-4)

    simpo = _first_step(tiny_model, tmp_path, rows, "simpo", "simpo.beta=2.5", "simpo.gamma=1.5",
                        "simpo.sft_weight=0.3")
    expected = sum(-logsig(2.5 * (c - r) - 1.5) for c, r in avg) / len(avg) + 0.3 * nll
    assert simpo["loss"] == pytest.approx(expected, rel=1e-4), simpo
    assert simpo["rewards/margins"] == pytest.approx(2.5 * sum(c - r for c, r in avg) / len(avg), rel=1e-3, abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("method, settings", [
    ("simpo", []),  # TRL's SimPO defaults (beta 2, gamma 0.5)
    # KTO on this tiny random model is seed- and machine-fragile: with beta 0.2, 3 epochs, lr 2e-3 it gave
    # 0.52 -> 0.70 on one CI machine and 0.52 -> 0.63 on another (same seed, same versions: float order).
    # TRL's default beta 0.1 with the DPO test's 4 epochs at lr 1e-3 gave 0.52 -> 0.98 at seed 0 (this
    # test's), far from the threshold; at seeds 1 and 3 it gave 0.68 and 0.52 (see the note below).
    ("kto", ["kto.beta=0.1", "training.epochs=4", "training.learning_rate=1e-3"]),
    # ORPO's NLL term dominates on a random-init model (the paper's lambda 0.1 is for pretrained ones)
    ("orpo", ["orpo.beta=5.0"]),
])
def test_orpo_simpo_and_kto_with_lora_also_make_the_model_prefer_the_right_answer(tiny_model, tmp_path, method,
                                                                                settings):
    """The DPO test's data and budget (minus an epoch) with each other method: held-out preference
    accuracy, as `finetune eval` reports it, rises well above the base's ~0.5. ORPO and SimPO rank
    replies by their mean log-probability per token, so theirs is the per-token accuracy (the
    replies differ in length: "odd" and "even" are not the same number of tokens here)."""
    from finetune.config import load_config
    from finetune.eval.evaluation import evaluate
    from finetune.training.recipe import train

    train_rows, held_out = parity_pairs(480, 60)
    train_path = write_jsonl(tmp_path / "train.jsonl", train_rows)
    eval_path = write_jsonl(tmp_path / "eval.jsonl", held_out)
    run = tmp_path / "run"
    train(load_config(None, [
        f"model={tiny_model}", f"data.train={train_path}", f"output_dir={run}", f"method={method}",
        "max_length=128", "training.epochs=3", "training.batch_size=8", "training.learning_rate=2e-3",
        "training.report_to=[none]", "lora.r=16", "lora.dropout=0", "seed=0", *settings]))
    assert json.loads((run / "adapter" / "finetune.json").read_text())["method"] == method
    assert not (run / "adapter" / "ref").exists()
    report = evaluate(data=eval_path, adapter=run / "adapter", output=tmp_path / "eval", distributed=False)
    base, tuned = report["models"]["base"]["preference"], report["models"]["tuned"]["preference"]
    score = "preference_accuracy" if method == "kto" else "preference_accuracy_per_token"
    assert abs(base[score] - 0.5) <= 0.15, base
    # Measured on this test's model: simpo 0.52 -> 0.90 and orpo 0.52 -> 0.80 (per token), kto 0.52 -> 0.98.
    # KTO's outcome depends on the seed on a model this small (a run can settle on the base's length
    # preference: "odd" and "even" are not the same number of tokens), so this checks that the kit's KTO
    # path can learn the task, not that every seed does.
    assert tuned[score] >= base[score] + (0.15 if method == "kto" else 0.2), (base, tuned)


def test_kto_kl_completions_come_from_the_other_examples_of_the_batch():
    from finetune.methods.preference import KTOBatchCollator

    examples = [{"prompt_ids": [1, 2], "completion_ids": [10 + i] * (i + 1), "label": i % 2 == 0, "length": 9}
                for i in range(3)]
    batch = KTOBatchCollator(pad_token_id=0, max_length=32)(examples)
    # example i is scored on its own completion and, for the KL estimate, on example i-1's
    assert batch["input_ids"].tolist() == [[1, 2, 10, 0, 0], [1, 2, 11, 11, 0], [1, 2, 12, 12, 12]]
    assert batch["KL_input_ids"].tolist() == [[1, 2, 12, 12, 12], [1, 2, 10, 0, 0], [1, 2, 11, 11, 0]]
    assert batch["KL_completion_mask"].tolist()[1] == [0, 0, 1, 0, 0]
    assert batch["label"].tolist() == [True, False, True]
    assert "KL_input_ids" not in KTOBatchCollator(pad_token_id=0, max_length=32, kl=False)(examples)


def test_kto_reads_pairs_and_unpaired_examples_and_starts_from_its_reference(tiny_model, tmp_path):
    pairs = price_pairs(4, 5)
    unpaired = [{"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
                for p in pairs for side in ("chosen", "rejected")]
    for name, rows in (("-pairs", pairs), ("-unpaired", unpaired)):
        # 4 pairs are 8 examples, one batch: with the reference = the policy every reward is 0 and
        # the loss is TRL's KTO loss at zero reward: 1 - sigmoid(0) = 0.5 per example.
        first = _first_step(tiny_model, tmp_path, rows, "kto", "training.batch_size=8", name=name)
        assert first["loss"] == pytest.approx(0.5, abs=1e-4), first
        assert first["kl"] == pytest.approx(0.0, abs=1e-5), first


def test_method_sections_are_checked_against_the_method(tiny_model, chat_data, tmp_path):
    from finetune.config import ConfigError, dump_config, load_config

    base = [f"model={tiny_model}", f"data.train={chat_data['train']}", f"output_dir={tmp_path}"]
    with pytest.raises(ConfigError) as e:
        load_config(None, [*base, "method=dpo", "orpo.beta=0.3", "simpo.gamma=1", "kto.loss_type=kto_pair"])
    msg = str(e.value)
    assert "orpo: set, but method is 'dpo'" in msg and "simpo: set, but method is 'dpo'" in msg
    assert "kto.loss_type" in msg and "apo_zero_unpaired" in msg
    for method in ("orpo", "simpo", "kto"):
        cfg = load_config(None, [*base, f"method={method}"])
        saved = tmp_path / f"{method}.yaml"
        saved.write_text(dump_config(cfg))
        assert load_config(saved).method == method  # a run's saved config loads again


def test_plan_counts_no_reference_for_orpo_and_simpo_and_one_for_kto():
    from dataclasses import replace

    from finetune.plan.memory import ModelShape, Setup, activation_bytes, make_plan

    shape = ModelShape(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=128, vocab_size=128256)
    sft = Setup(adapter="full", micro_batch=2, seq_len=2048, precision="bf16", weight_dtype="bfloat16")
    names = lambda s: {x.name for x in make_plan(shape, s, alternatives=False).lines}  # noqa: E731
    for method in ("orpo", "simpo"):
        s = replace(sft, method=method)
        assert not any("reference" in n for n in names(s)) and not any("reference" in n for n in
                                                                        names(replace(s, adapter="lora")))
        assert activation_bytes(shape, s)["layers"] == activation_bytes(shape, replace(sft, micro_batch=4))["layers"]
    kto = replace(sft, method="kto")
    assert "reference model (KTO, frozen)" in names(kto)
    assert "reference adapter (KTO, frozen)" in names(replace(kto, adapter="lora"))
    # the KL pairs' forward runs without gradients: the saved activations are the batch's own
    assert activation_bytes(shape, kto)["layers"] == activation_bytes(shape, sft)["layers"]


@pytest.mark.distributed
@pytest.mark.slow
def test_orpo_and_kto_with_lora_under_zero3_on_two_processes(tiny_model, tmp_path):
    """The reference-free trainer (TRL's fused LM head gathered under ZeRO-3) and KTO (reference =
    adapter off, KL pairs within each rank's batch) on 2 processes; adapters plain PEFT loads."""
    pytest.importorskip("deepspeed")
    from tests.finetune.test_distributed import MAX_STEPS, _check_adapter, _write_config

    pairs = write_jsonl(tmp_path / "pairs.jsonl", price_pairs(96, 0))
    for method in ("orpo", "kto"):
        d = tmp_path / method
        d.mkdir()
        config, run = _write_config(d, tiny_model, {"train": pairs}, method=method)
        _zero3_on_two_ranks(config, run, method)
        logged = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
        assert len(logged) == MAX_STEPS, logged
        if method == "orpo":  # the NLL falls: the model learns the chosen answers
            assert logged[-1]["nll_loss"] < logged[0]["nll_loss"], logged
        else:  # KTO starts at its reference (loss 0.5, every reward 0) and the policy moves away from it
            assert logged[0]["loss"] == pytest.approx(0.5, abs=1e-3), logged
            assert any(abs(r.get("rewards/margins", 0.0)) > 1e-4 for r in logged[1:]), logged
        _check_adapter(run, tiny_model)


def test_the_trl_losses_the_reference_free_trainer_calls_are_guarded(monkeypatch):
    import finetune.methods.preference as pref

    orpo, cpo = pref._trl_pair_losses()
    assert orpo.__qualname__ == "ORPOTrainer.odds_ratio_loss" and cpo.__qualname__ == "CPOTrainer.cpo_loss"
    from trl.experimental.orpo import ORPOTrainer

    monkeypatch.setattr(ORPOTrainer, "odds_ratio_loss", lambda self, chosen, rejected, beta: None)
    with pytest.raises(ImportError, match="odds_ratio_loss now takes"):
        pref._trl_pair_losses()
