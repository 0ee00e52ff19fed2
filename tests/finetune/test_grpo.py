"""`method: grpo`: prompt records and their data cache, the reward functions (built-ins, Python
paths, failures counted and never fatal), the first step's advantages and loss against a hand
computation for each loss (grpo, dr_grpo, dapo, with clipping), and runs end to end (one process,
2-process DDP and ZeRO-3) whose adapter loads in plain peft."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from finetune.config import ConfigError
from kitcore.prompts import PromptError, normalize_prompt
from tests.conftest import make_chat_examples, write_jsonl

U = {"role": "user", "content": "How much is the oak desk? The oak desk costs $12."}
S = {"role": "system", "content": "Answer with the price only."}


def price_prompts(n: int, seed: int) -> list[dict]:
    """The quickstart's price look-ups as prompt records: the chat with its answer as the last turn."""
    return [{"messages": ex["messages"][:2] if ex["messages"][0]["role"] != "system" else ex["messages"][:3]}
            for ex in make_chat_examples(n, seed)]


# ---- reward functions the tests name by `module:function` ----
def reward_by_length(prompts, completions, completion_ids, **kw):
    """A reward that differs within a group: the completion's length / 10."""
    return [len(ids) / 10 for ids in completion_ids]


def even_tokens(prompts, completions, completion_ids, **kw):
    """A reward a random model's completions differ in: the share of even token ids."""
    return [sum(t % 2 == 0 for t in ids) / max(1, len(ids)) for ids in completion_ids]


def flaky_reward(prompts, completions, completion_ids, **kw):
    """A user's bug, not the run's end: raises when the first token id is a multiple of 3, returns a
    string when it is 1 more than one."""
    out = []
    for ids in completion_ids:
        if ids[0] % 3 == 0:
            raise RuntimeError("first token")
        out.append("one" if ids[0] % 3 == 1 else 1.0)
    return out


# ----------------------------------------------------------------------------------------------
# prompt records
# ----------------------------------------------------------------------------------------------
def test_prompt_records_read_the_same_in_every_format():
    trailing = normalize_prompt({"messages": [S, U, {"role": "assistant", "content": "$12"}], "tests": [1]})
    given = normalize_prompt({"messages": [S, U], "answer": "$12", "tests": [1]})
    trl = normalize_prompt({"prompt": [S, U], "answer": "$12", "tests": [1]})
    assert trailing == given == trl
    assert trailing.messages == [S, U] and trailing.columns == {"answer": "$12", "tests": [1]}
    text = normalize_prompt({"prompt": U["content"]})
    assert text.messages == [U] and text.columns == {}
    call = {"id": "c1", "type": "function", "function": {"name": "price", "arguments": '{"item": "desk"}'}}
    tools = [{"type": "function", "function": {"name": "price", "parameters": {"type": "object"}}}]
    rec = normalize_prompt({"messages": [U, {"role": "assistant", "content": None, "tool_calls": [call]}],
                            "tools": tools})
    assert rec.tools == tools and rec.columns["tool_calls"][0]["function"]["name"] == "price"


@pytest.mark.parametrize("record, kind", [
    ({"prompt": "  "}, "empty_prompt"),
    ({"messages": [{"role": "assistant", "content": "$1"}]}, "empty_prompt"),
    ({"messages": [U, {"role": "assistant", "content": "$1"}], "answer": "$1"}, "ambiguous_answer"),
    ({"messages": [U], "prompt": "x"}, "ambiguous_prompt"),
    ({"messages": [S]}, "prompt_not_ending_with_user"),
    ({"text": "hello"}, "not_a_prompt_record"),
    ({"messages": [{"role": "user"}]}, None),
])
def test_a_bad_prompt_record_names_its_problem(record, kind):
    with pytest.raises(PromptError) as err:
        normalize_prompt(record)
    if kind:
        assert err.value.kind == kind, str(err.value)


def _cfg(tiny_model, train, tmp_path, *extra):
    from finetune.config import load_config

    return load_config(None, [f"model={tiny_model}", f"data.train={train}", f"output_dir={tmp_path / 'run'}",
                              "method=grpo", "grpo.rewards=[{type: exact_match}]", "grpo.num_generations=4",
                              "grpo.max_completion_length=16", "training.batch_size=4", "max_length=128",
                              "training.report_to=[none]", "seed=0", *extra])


def test_the_cache_holds_the_rendered_prompt_ids_and_the_columns(tiny_model, tmp_path):
    from finetune.data.cache import prepared_split
    from finetune.data.chat_template import render_prompt
    from finetune.data.prompts import decode_row
    from finetune.models.loading import load_tokenizer

    rows = price_prompts(20, 0)
    rows[3]["tests"] = ["a", 1]
    long = {"messages": [{"role": "user", "content": "word " * 200}], "answer": "x"}
    train = write_jsonl(tmp_path / "prompts.jsonl", [*rows, long])
    cfg = _cfg(tiny_model, train, tmp_path)
    tok = load_tokenizer(str(tiny_model))
    ds, stats, _ = prepared_split(cfg, tok, str(train))
    assert stats.examples == 21 and stats.kept == len(ds) == 20 and stats.dropped == {"prompt_too_long": 1}
    for i in (0, 3):
        rec = decode_row(ds[i])
        want = normalize_prompt(rows[i])
        assert rec["prompt"] == want.messages
        assert rec["prompt_ids"] == tok(render_prompt(tok, want.messages), add_special_tokens=False)["input_ids"]
        assert tok.decode(rec["prompt_ids"]).endswith("<|im_start|>assistant\n")
        assert rec["answer"] == rows[i]["messages"][-1]["content"] and rec["answer"].startswith("$")
        assert ds[i]["length"] == len(rec["prompt_ids"]) + 16  # the completion's room
    assert decode_row(ds[3])["tests"] == ["a", 1]
    # The completion room is part of the cache key: another room is another cache.
    _, _, here = prepared_split(cfg, tok, str(train))
    _, _, other = prepared_split(_cfg(tiny_model, train, tmp_path, "grpo.max_completion_length=8"), tok, str(train))
    assert here != other


def test_a_bad_prompt_line_is_named_with_its_file_and_line(tiny_model, tmp_path):
    from finetune.data.cache import prepared_split
    from finetune.data.files import DataError
    from finetune.models.loading import load_tokenizer

    train = write_jsonl(tmp_path / "prompts.jsonl", [*price_prompts(3, 0), {"messages": [S]}])
    with pytest.raises(DataError, match=re.escape(f"{train}:4") + ".*ends with a 'system' turn"):
        prepared_split(_cfg(tiny_model, train, tmp_path), load_tokenizer(str(tiny_model)), str(train))


# ----------------------------------------------------------------------------------------------
# the config
# ----------------------------------------------------------------------------------------------
def test_grpo_config_errors_name_their_keys(tiny_model, tmp_path):
    from finetune.config import load_config

    train = write_jsonl(tmp_path / "x.jsonl", price_prompts(2, 0))
    base = [f"model={tiny_model}", f"data.train={train}", f"output_dir={tmp_path}/run", "method=grpo"]
    cases = {
        "grpo.rewards": [],
        "grpo.rewards.0.type": ["grpo.rewards=[{type: exact_matsh}]"],
        "grpo.rewards.0": ["grpo.rewards=[{type: regex}]"],
        "grpo.max_completion_length": ["grpo.rewards=[{type: exact_match}]", "max_length=64",
                                       "grpo.max_completion_length=64"],
        "training.batch_size": ["grpo.rewards=[{type: exact_match}]", "training.batch_size=auto",
                                "training.examples_per_step=8"],
        "grpo": ["grpo.rewards=[{type: regex, pattern: a}, {type: regex, pattern: b}]"],
    }
    for key, over in cases.items():
        with pytest.raises(ConfigError) as err:
            load_config(None, [*base, *over])
        assert any(k == key for k, _ in err.value.problems), (key, err.value.problems)
    with pytest.raises(ConfigError, match="grpo"):  # a grpo section under another method
        load_config(None, [*base[:-1], "grpo.num_generations=4"])


def test_the_step_must_hold_whole_groups(tiny_model, tmp_path):
    from finetune.methods.grpo_trainer import arguments

    train = write_jsonl(tmp_path / "p.jsonl", price_prompts(4, 0))
    with pytest.raises(ConfigError, match="multiple of grpo.num_generations") as err:
        arguments(_cfg(tiny_model, train, tmp_path, "training.batch_size=3"))
    assert err.value.problems[0][0] == "training.batch_size"
    cls, fields = arguments(_cfg(tiny_model, train, tmp_path, "training.batch_size=2", "training.grad_accum=2",
                                 "grpo.loss_type=dr_grpo", "grpo.beta=0.04"))
    assert fields["loss_type"] == "dr_grpo" and fields["beta"] == 0.04 and fields["num_generations"] == 4


# ----------------------------------------------------------------------------------------------
# reward functions
# ----------------------------------------------------------------------------------------------
def _rewards(*specs, room: int = 16):
    from finetune.methods.grpo import RewardSpec
    from finetune.methods.rewards import build_rewards

    return build_rewards([RewardSpec(**s) for s in specs], room)


def _chat(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def test_exact_match_normalises_text_and_numbers():
    (em,) = _rewards({"type": "exact_match"})
    got = em(prompts=[[U]] * 6, completions=[_chat(t) for t in ("$12", " $12. ", "12", "$1,299.00", "$13", "Twelve")],
             completion_ids=[[1]] * 6, answer=["$12", "$12", "$12", "1299", "$12", "twelve"])
    assert got == [1.0, 1.0, 1.0, 1.0, 0.0, 1.0]
    (ex,) = _rewards({"type": "exact_match", "extract": r"answer is (\S+)"})
    got = ex(prompts=[[U]] * 3, completions=["the answer is 4, no, the answer is 5", "5", "answer is 5"],
             completion_ids=[[1]] * 3, answer=["5", "5", "5."])
    assert got == [1.0, 0.0, 1.0]


def test_regex_json_schema_tool_call_and_length_rewards():
    (rx, full) = _rewards({"type": "regex", "pattern": r"\$\d+"}, {"type": "regex", "pattern": r"\$\d+",
                                                                   "full_match": True, "name": "full"})
    texts = ["$12", "it is $12", "twelve"]
    assert rx(prompts=[[U]] * 3, completions=[_chat(t) for t in texts], completion_ids=[[1]] * 3) == [1.0, 1.0, 0.0]
    assert full(prompts=[[U]] * 3, completions=[_chat(t) for t in texts], completion_ids=[[1]] * 3) == [1.0, 0.0, 0.0]

    schema = {"type": "object", "properties": {"price": {"type": "number"}}, "required": ["price"]}
    (js,) = _rewards({"type": "json_schema", "schema": schema})
    texts = ['{"price": 12}', '```json\n{"price": 12.5}\n```', '{"price": "12"}', "price: 12"]
    assert js(prompts=[[U]] * 4, completions=[_chat(t) for t in texts], completion_ids=[[1]] * 4) == [1, 1, 0, 0]
    (per_row,) = _rewards({"type": "json_schema", "column": "schema"})
    assert per_row(prompts=[[U]] * 2, completions=[_chat("[1]"), _chat("[1]")], completion_ids=[[1]] * 2,
                   schema=[{"type": "array"}, json.dumps({"type": "object"})]) == [1.0, 0.0]

    tools = [{"type": "function", "function": {"name": "price", "parameters": {"type": "object"}}}]
    ref = [{"type": "function", "function": {"name": "price", "arguments": '{"item": "desk", "n": 1}'}}]
    (tc,) = _rewards({"type": "tool_call"})
    texts = ['<tool_call>{"name": "price", "arguments": {"n": 1, "item": "desk"}}</tool_call>',
             '<tool_call>{"name": "price", "arguments": {"item": "lamp", "n": 1}}</tool_call>',
             '<tool_call>{"name": "cost", "arguments": {"item": "desk", "n": 1}}</tool_call>',
             "It costs $12.", '<tool_call>{"name": "price", "arguments": {"item": ']
    assert tc(prompts=[[U]] * 5, completions=[_chat(t) for t in texts], completion_ids=[[1]] * 5,
              tool_calls=[ref] * 5, tools=[tools] * 5) == [1.0, 0.0, 0.0, 0.0, 0.0]
    # the arguments compare as JSON values, as `finetune eval`'s tool-call metric compares them: 1 = 1.0
    two = '<tool_call>{"name": "price", "arguments": {"item": "desk", "n": 1.0}}</tool_call>' * 2
    assert tc(prompts=[[U]] * 2, completions=[_chat(texts[0].replace('"n": 1', '"n": 1.0')), _chat(two)],
              completion_ids=[[1]] * 2, tool_calls=[ref] * 2, tools=[tools] * 2) == [1.0, 0.0]  # one call, not two
    from finetune.data.chat_template import parse_tool_calls
    from finetune.eval.metrics import score_tool_calls
    reply = parse_tool_calls(texts[0].replace('"n": 1', '"n": 1.0'))
    assert score_tool_calls([(reply.tool_calls, reply.invalid)], [ref])[1]["tool_arguments_exact_match"] == 1.0

    (lp,) = _rewards({"type": "length_penalty", "soft_tokens": 4}, room=16)
    lengths = [1, 12, 13, 14, 16]
    assert lp(prompts=[[U]] * 5, completions=[_chat("x")] * 5, completion_ids=[[7] * n for n in lengths]) == \
        [0.0, 0.0, -0.25, -0.5, -1.0]


def test_a_reward_that_raises_is_counted_not_fatal():
    (fl,) = _rewards({"type": "tests.finetune.test_grpo:flaky_reward", "on_error": -1.0})
    assert fl.__name__ == "flaky_reward"
    ids = [[3, 2], [2], [6, 2, 3, 4], [4, 3]]
    assert fl(prompts=[[U]] * 4, completions=[_chat("x")] * 4, completion_ids=ids) == [-1.0, 1.0, -1.0, -1.0]
    assert fl.total_errors == {"RuntimeError: first token": 2, "TypeError: returned str 'one', not a number": 1}
    assert fl.take_errors() == 3 and fl.take_errors() == 0
    (em,) = _rewards({"type": "exact_match"})  # the records have no answer: counted, scored on_error
    assert em(prompts=[[U]], completions=[_chat("$1")], completion_ids=[[1]]) == [0.0]
    assert "no 'answer' column" in next(iter(em.total_errors))


def test_a_reward_path_that_does_not_import_is_a_config_error():
    for path in ("tests.finetune.test_grpo:no_such_function", "no_such_module_xyz:f", "tests.finetune.test_grpo:U"):
        with pytest.raises(ConfigError) as err:
            _rewards({"type": path})
        assert err.value.problems[0][0] == "grpo.rewards[0].type", err.value.problems


# ----------------------------------------------------------------------------------------------
# the first step against a hand computation
# ----------------------------------------------------------------------------------------------
def _trainer(tiny_model, tmp_path, *over):
    from transformers import AutoModelForCausalLM

    from finetune.models.loading import load_tokenizer
    from finetune.training.arguments import training_arguments
    from finetune.training.launch import resolve_launch
    from finetune.training.recipe import _setup_data, _setup_trainer
    from kitcore.runtime import current

    train = write_jsonl(tmp_path / "prompts.jsonl", price_prompts(16, 0))
    cfg = _cfg(tiny_model, train, tmp_path, "grpo.rewards=[{type: 'tests.finetune.test_grpo:reward_by_length'}]",
               "training.batch_size=8", *over)
    tok = load_tokenizer(cfg.model)
    train_ds, _, _ = _setup_data(cfg, tok)
    args = training_arguments(cfg, Path(cfg.output_dir), False, resolve_launch(cfg, current()))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0,
                                             init_lora_weights=False))  # B != 0: the policy is not the base
    return _setup_trainer(cfg, args, Path(cfg.output_dir), model, tok, train_ds, None), train_ds, tok


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_the_first_step_equals_a_hand_computation(tiny_model, tmp_path, loss_type):
    trainer, ds, tok = _trainer(tiny_model, tmp_path, f"grpo.loss_type={loss_type}", "grpo.epsilon=0.2",
                                "grpo.epsilon_high=0.28")
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    assert eot in trainer.eos_token_ids  # generation stops at the template's end of turn
    # 2 prompts x 4 completions of different lengths (fixed here: generation is sampling, the loss is not).
    lengths = [3, 5, 2, 6, 4, 4, 7, 1]
    fixed = [[(11 * i + j) % 200 + 50 for j in range(n - 1)] + [eot] for i, n in enumerate(lengths)]
    trainer._generate_single_turn = lambda prompt_ids, images, fields, n, **kw: (
        [list(c) for c in fixed], None)
    rows = [ds[i] for i in (0, 0, 0, 0, 1, 1, 1, 1)]  # TRL's sampler: each prompt num_generations times
    trainer.model.train()
    batch = trainer._generate_and_score_completions(rows)

    rewards = torch.tensor(lengths, dtype=torch.float32) / 10
    groups = rewards.view(2, 4)
    want_adv = ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)).flatten()
    assert torch.allclose(batch["advantages"], want_adv, atol=1e-6), (batch["advantages"], want_adv)
    assert [int(m.sum()) for m in batch["completion_mask"]] == lengths

    # The loss, with an old policy that puts some ratios outside [1 - 0.2, 1 + 0.28]: clipping is exercised.
    model = trainer.model
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attn = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    C = batch["completion_ids"].size(1)
    logits = model(input_ids=ids, attention_mask=attn).logits[:, -C - 1:-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)
    shift = torch.tensor([[0.5, -0.5, 0.05, 0.0, -0.3, 0.3, 0.1]], dtype=torch.float32)[:, :C].expand_as(logp)
    old = (logp.detach() + shift)
    ratio = torch.exp(logp - old)
    A = batch["advantages"].unsqueeze(1)
    per_tok = -torch.min(ratio * A, torch.clamp(ratio, 0.8, 1.28) * A)
    m = batch["completion_mask"].float()
    clipped = ((ratio < 0.8) | (ratio > 1.28)) & (m > 0)
    assert clipped.any() and (~clipped & (m > 0)).any()
    if loss_type == "grpo":
        want = ((per_tok * m).sum(1) / m.sum(1)).mean()
    elif loss_type == "dr_grpo":
        want = (per_tok * m).sum() / (m.size(0) * 16)
    else:
        want = (per_tok * m).sum() / m.sum()
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    inputs = {**batch, "old_per_token_logps": old.detach()}
    trainer.current_gradient_accumulation_steps = 1  # what the training loop sets for a step of one micro-batch
    got = trainer.compute_loss(model, inputs)
    got.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7)
    assert want.abs().item() > 1e-4  # not the trivial zero of an unclipped first step
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, want_grads[n], rtol=1e-4, atol=1e-7), n


# ----------------------------------------------------------------------------------------------
# runs
# ----------------------------------------------------------------------------------------------
def _metrics(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def test_a_grpo_run_logs_rewards_rollouts_and_counted_failures(tiny_model, tmp_path):
    from finetune.config import load_config
    from finetune.training.recipe import train
    from tests.finetune.test_distributed import _check_adapter

    train_file = write_jsonl(tmp_path / "prompts.jsonl", price_prompts(16, 0))
    run = train(load_config(None, [
        f"model={tiny_model}", f"data.train={train_file}", f"output_dir={tmp_path / 'run'}", "method=grpo",
        "grpo.rewards=[{type: exact_match}, {type: 'tests.finetune.test_grpo:even_tokens'}, "
        "{type: 'tests.finetune.test_grpo:flaky_reward', weight: 0.5}, {type: length_penalty, weight: 0.1}]",
        "grpo.num_generations=4", "grpo.max_completion_length=8", "training.batch_size=4", "training.grad_accum=2",
        "training.max_steps=3", "training.logging_steps=1", "training.learning_rate=5e-3", "lora.r=8",
        "training.report_to=[none]", "max_length=128", "seed=0"]))
    logged = [m for m in _metrics(run) if "loss" in m]
    assert len(logged) == 3, logged
    for m in logged:
        for key in ("reward", "reward_std", "frac_reward_zero_std", "rewards/exact_match/mean",
                    "rewards/flaky_reward/mean", "rewards/length_penalty/mean", "completions/mean_length"):
            assert key in m, (key, m)
        assert m["rollout/tokens_per_s"] > 0 and 0 < m["rollout/share"] < 1 and m["train/tokens_per_s"] > 0, m
    errors = sum(m["rewards/flaky_reward/errors"] for m in logged)
    assert errors > 0, logged  # a random tiny model starts some completions so: they failed, were counted, the run went on
    assert any(m["grad_norm"] > 0 for m in logged), logged  # even_tokens differs within groups: it trained
    info = json.loads((run / "run.json").read_text())
    through = info["throughput"]
    assert sum(through["reward_errors"]["flaky_reward"].values()) == errors
    assert through["rollout_tokens"] > 0 and 0 < through["rollout_share"] < 1
    for m in logged:  # achieved FLOPs and utilisation, as SFT runs log them, for each phase too
        assert m["tflops"] > 0 and all(0 < m[k] < 1 for k in ("mfu", "mfu_6n", "train/mfu", "rollout/mfu")), m
    f = through["flops"]
    assert through["mfu_6n"] / through["mfu"] == pytest.approx(
        (f["train_flops_6n"] + f["rollout_flops"]) / (f["train_flops"] + f["rollout_flops"]), rel=2e-3)
    assert "CPU: measured fp32 matmul" in through["mfu_peak"]
    # 3 steps x 2 accum x 4 completions, each at most 8 tokens
    assert through["rollout_tokens"] <= 3 * 2 * 4 * 8
    _check_adapter(run, tiny_model)


def test_the_flops_of_an_interval_are_counted_by_hand():
    from finetune.methods.grpo_trainer import grpo_flops
    from finetune.training.throughput import ModelFlops

    flops = ModelFlops(frozen=100, trainable=10, attn_layers=2, attn_width=8)
    # two rows of 10 and 20 tokens trained; the same two sequences generated
    counts = {"train_tokens": 30, "train_sum_sq": 10**2 + 20**2, "gen_seq_tokens": 30, "gen_sum_sq": 500}
    assert grpo_flops(flops, counts) == {
        "train_flops": 30 * (4 * 100 + 6 * 10) + 12 * 2 * 8 * 500,  # forward + backward, frozen base
        "train_flops_6n": 30 * 6 * 110 + 12 * 2 * 8 * 500,
        "rollout_flops": 30 * 2 * 110 + 4 * 2 * 8 * 500,  # one forward's work
    }


def _grpo_yaml(tmp_path, tiny_model, **extra):
    from tests.finetune.test_distributed import _write_config

    prompts = write_jsonl(tmp_path / "prompts.jsonl", price_prompts(64, 0))
    return _write_config(tmp_path, tiny_model, {"train": prompts}, method="grpo", grpo={
        "rewards": [{"type": "tests.finetune.test_grpo:even_tokens"},
                    {"type": "tests.finetune.test_grpo:flaky_reward", "weight": 0.1}], "num_generations": 4,
        "max_completion_length": 8}, **extra)


def _two_ranks_trained(run: Path, res, steps: int) -> None:
    from tests.finetune.test_distributed import _probes, _show

    why = _show(res)
    assert json.loads((run / "run.json").read_text())["world_size"] == 2, why
    p0, p1 = _probes(run)
    # batch 4 = one prompt's 4 completions per rank: the ranks hold different prompts
    seen0 = {h for b in p0["batches"] for h in b}
    seen1 = {h for b in p1["batches"] for h in b}
    assert seen0 and seen1 and not seen0 & seen1, why
    # each rank's rows are the ones the plan's replay of TRL's sampler deals it
    assert [p0["batches"], p1["batches"]] == _replayed_batches(run.parent / "train.yaml", len(p0["batches"])), why
    logged = [m for m in _metrics(run) if "loss" in m]
    assert len(logged) == steps and all(math.isfinite(m["loss"]) and "reward" in m for m in logged), logged
    assert all(m["rollout/tokens_per_s"] > 0 for m in logged), logged
    # the failing reward's errors: counted on both ranks, in the log lines and by reason in run.json
    errors = sum(m["rewards/flaky_reward/errors"] for m in logged)
    reasons = json.loads((run / "run.json").read_text())["throughput"]["reward_errors"]
    assert errors > 0 and sum(reasons["flaky_reward"].values()) == errors, (errors, reasons)


def _replayed_batches(config: Path, n: int, world_size: int = 2) -> list[list[list[str]]]:
    """Per rank, the probe's hashes of the first `n` batches finetune.plan.batches.rollout_generations deals it."""
    import hashlib

    from finetune.config import load_config
    from finetune.data.cache import prepared_split
    from finetune.models.loading import load_tokenizer
    from finetune.plan.batches import rollout_generations
    from tests.finetune.rank_probe import RankProbe

    cfg = load_config(config)
    ds, _, _ = prepared_split(cfg, load_tokenizer(cfg.model), cfg.data.train, progress=False)
    t = cfg.training
    gens = rollout_generations(len(ds), batch_size=t.batch_size, grad_accum=t.grad_accum, world_size=world_size,
                               group=cfg.grpo.num_generations, seed=cfg.seed, micro_batches=n)
    out: list[list[list[str]]] = [[] for _ in range(world_size)]
    for _, _, rows in gens:
        for rank, ids in enumerate(rows):
            out[rank].append([hashlib.sha1(str(RankProbe._identity(ds[int(i)])).encode()).hexdigest()[:12]
                              for i in ids])
    return out


@pytest.mark.distributed
@pytest.mark.slow
def test_grpo_on_two_processes_ddp(tiny_model, tmp_path):
    from tests.finetune.test_distributed import MAX_STEPS, _check_adapter, _probes, _run_ok

    config, run = _grpo_yaml(tmp_path, tiny_model)
    res = _run_ok("ddp.yaml", config)
    _two_ranks_trained(run, res, MAX_STEPS)
    p0, p1 = _probes(run)
    assert p0["trainable_sum"] == pytest.approx(p1["trainable_sum"], rel=1e-6, abs=1e-9)  # in step
    _check_adapter(run, tiny_model)


@pytest.mark.distributed
@pytest.mark.slow
def test_grpo_under_zero3_on_two_processes(tiny_model, tmp_path):
    pytest.importorskip("deepspeed")
    from tests.finetune.test_distributed import MAX_STEPS, _check_adapter, _run_ok

    config, run = _grpo_yaml(tmp_path, tiny_model)
    res = _run_ok("deepspeed_zero3.yaml", config)
    assert "ZeRO stage 3" in res.stdout
    _two_ranks_trained(run, res, MAX_STEPS)
    _check_adapter(run, tiny_model)  # gathered from the shards, plain-PEFT loadable


# ----------------------------------------------------------------------------------------------
# evaluation by the run's reward functions
# ----------------------------------------------------------------------------------------------
def test_finetune_eval_scores_held_out_prompts_with_the_runs_rewards(tiny_model, tmp_path):
    """A grpo run's adapter records its reward functions; `finetune eval` scores one greedy reply per
    held-out prompt with them, base and tuned, and the means equal a recomputation from the saved
    predictions with plain transformers + peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.config import load_config
    from finetune.eval.evaluation import evaluate
    from finetune.methods.grpo import RewardSpec
    from finetune.methods.rewards import build_rewards
    from finetune.training.recipe import train

    train_file = write_jsonl(tmp_path / "prompts.jsonl", price_prompts(16, 0))
    held = price_prompts(6, 7)
    held[2] = {"prompt": held[2]["messages"][:-1], "answer": held[2]["messages"][-1]["content"]}  # TRL's format
    held_file = write_jsonl(tmp_path / "held.jsonl", [*held, {"messages": [S]}])  # the last line is skipped
    run = train(load_config(None, [
        f"model={tiny_model}", f"data.train={train_file}", f"output_dir={tmp_path / 'run'}", "method=grpo",
        "grpo.rewards=[{type: exact_match}, {type: 'tests.finetune.test_grpo:even_tokens', weight: 0.5}]",
        "grpo.num_generations=4", "grpo.max_completion_length=8", "training.batch_size=4", "training.max_steps=2",
        "training.learning_rate=5e-2", "training.report_to=[none]", "max_length=128", "seed=0"]))
    meta = json.loads((run / "adapter" / "finetune.json").read_text())
    assert [r["type"] for r in meta["rewards"]["rewards"]] == ["exact_match", "tests.finetune.test_grpo:even_tokens"]
    report = evaluate(data=held_file, output=tmp_path / "eval", adapter=run / "adapter", max_new_tokens=8,
                      batch_size=4, distributed=False)
    assert report["meta"]["data"]["skipped"][0]["line"] == 7
    preds = [json.loads(ln) for ln in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(run / "adapter")
    rewards = build_rewards([RewardSpec(type="exact_match"),
                             RewardSpec(type="tests.finetune.test_grpo:even_tokens", weight=0.5)], 8)
    for label in ("base", "tuned"):
        scores = report["models"][label]["rewards"]
        rows = [p for p in preds if p["model"] == label]
        assert scores["n"] == len(rows) == 6 and scores["errors"] == 0
        replies = [r["prediction"] for r in rows]
        # independent: the rewards over the saved replies
        ids = [tok(r, add_special_tokens=False)["input_ids"] for r in replies]
        em = rewards[0](prompts=[None] * 6, completions=[_chat(r) for r in replies], completion_ids=ids,
                        answer=[normalize_prompt(h).columns["answer"] for h in held])
        ev = rewards[1](prompts=[None] * 6, completions=[_chat(r) for r in replies], completion_ids=ids)
        assert scores["exact_match"] == pytest.approx(sum(em) / 6)
        assert scores["even_tokens"] == pytest.approx(sum(ev) / 6)
        assert scores["reward"] == pytest.approx(sum(a + 0.5 * b for a, b in zip(em, ev)) / 6)
    # the tuned replies are the adapter's: regenerate one with plain transformers + peft, greedy
    from finetune.data.chat_template import render_prompt

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), run / "adapter").eval()
    first = normalize_prompt(held[0]).messages
    enc = tok(render_prompt(tok, first), return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=8, do_sample=False,
                         eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    tuned_first = next(p for p in preds if p["model"] == "tuned")["prediction"]
    assert text.strip() == tuned_first.strip()


# ----------------------------------------------------------------------------------------------
# preview, validate, plan
# ----------------------------------------------------------------------------------------------
def test_preview_shows_the_prompt_the_model_generates_after_and_the_reward_columns(tiny_model, tmp_path):
    from finetune.data.chat_template import render_prompt
    from finetune.data.preview import preview_examples
    from finetune.models.loading import load_tokenizer

    rows = price_prompts(3, 0)
    train = write_jsonl(tmp_path / "p.jsonl", rows)
    shown = preview_examples(_cfg(tiny_model, train, tmp_path), n=2)
    tok = load_tokenizer(str(tiny_model))
    assert len(shown) == 2 and all(ex["n_trained"] == 0 for ex in shown)
    want = normalize_prompt(rows[0])
    assert "".join(t["text"] for t in shown[0]["tokens"]) == tok.decode(
        tok(render_prompt(tok, want.messages), add_special_tokens=False)["input_ids"])
    assert shown[0]["columns"] == want.columns and "answer" in shown[0]["columns"]


def test_data_prep_validate_reads_prompt_records(tmp_path):
    from data_prep.validate import validate_file

    good = [{"messages": [U]}, {"prompt": "What is 2+2?", "answer": "4"},
            {"messages": [S, U, {"role": "assistant", "content": "$12"}]}]
    bad = [{"messages": [S]}, {"prompt": ""}]
    path = write_jsonl(tmp_path / "p.jsonl", [*good, *bad])
    res = validate_file(str(path), prompts=True)
    assert res.examples == 5 and [(e.line, e.kind) for e in res.errors] == [
        (4, "prompt_not_ending_with_user"), (5, "empty_prompt")]
    assert not validate_file(str(write_jsonl(tmp_path / "g.jsonl", good)), prompts=True).errors


def test_the_plan_counts_the_completion_logits_and_the_rollouts_kv_cache(tiny_model, tmp_path):
    from finetune.plan.memory import GiB, make_plan, setup_from_config
    from finetune.plan.shapes import ModelShape

    train = write_jsonl(tmp_path / "p.jsonl", price_prompts(4, 0))
    shape = ModelShape.from_config({"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
                                    "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
                                    "vocab_size": 128256, "max_position_embeddings": 4096}, "1b")
    cfg = _cfg(tiny_model, train, tmp_path, "max_length=2048", "grpo.max_completion_length=512",
               "training.batch_size=8", "training.grad_accum=8")
    s = setup_from_config(cfg, device="gpu", device_memory=80 * GiB)
    assert (s.completion_len, s.rollout_rows) == (512, 64)
    plan = make_plan(shape, s, alternatives=False)
    lines = {x.name: x for x in plan.lines}
    # TRL's fused LM head over the completions only (8 rows x 512 positions): their hidden states (bf16)
    # and the fp32 gradient of them, 7 fp32 statistics each, and one bf16 tile of 4,096 positions x 32,768
    # vocabulary entries; never the [rows, completion, vocabulary] logits.
    head = lines["activations: logits + loss"]
    assert head.device == pytest.approx(8 * 512 * ((2 + 4) * 2048 + 7 * 4) + 2 * 4096 * 32768, rel=1e-3)
    assert "trained positions only" in head.note
    # rollouts: 64 rows x 2048 tokens of KV cache (2 x 16 layers x 8 heads x 64 dims x 2 B) = 4 GiB,
    # more than the step's activations beyond it
    kv = 2 * 16 * 8 * 64 * 2 * 64 * 2048
    assert kv == 4 * GiB
    rollout = lines["rollouts: KV cache beyond the step"]
    assert "KV cache 4.00 GiB" in rollout.note
    acts = sum(x.device for x in plan.lines if x.name.startswith(("activations", "overlap")))
    step = 64 * (12 * 128256 + 2 * (2 * 2048 + 3 * 8192))
    assert rollout.device == pytest.approx(max(0.0, kv + step - acts))
    # one micro-batch per generation: the step needs more than the rollouts
    small = make_plan(shape, setup_from_config(_cfg(tiny_model, train, tmp_path, "max_length=2048",
                                                    "grpo.max_completion_length=512", "training.batch_size=8"),
                                               device="gpu", device_memory=80 * GiB), alternatives=False)
    assert {x.name: x for x in small.lines}["rollouts: KV cache beyond the step"].device == 0.0


@pytest.mark.slow
def test_a_grpo_sweep_maximises_the_held_out_reward(tmp_path, tiny_model, chat_data):
    """objective: rewards.<name> scores each trial's adapter on the prompt records of eval.data with the
    run's reward functions; the trial's value equals a recomputation from its adapter."""
    import optuna
    import yaml

    from finetune.eval.rewards import read_prompt_records, resolve_rewards, score_reward_model
    from finetune.inference.load import load_for_inference
    from finetune.sweep import load_sweep_config, make_storage, run_sweep
    from tests.finetune.test_sweep import _write_base, _write_sweep

    base = _write_base(tmp_path, tiny_model, chat_data, eval_steps=None, logging_steps=2, max_steps=2,
                       batch_size=4)
    raw = yaml.safe_load(base.read_text())
    raw.update(method="grpo", data={"train": str(write_jsonl(tmp_path / "p.jsonl", price_prompts(16, 0)))},
               eval={"data": str(write_jsonl(tmp_path / "held.jsonl", price_prompts(6, 3))), "max_new_tokens": 8},
               grpo={"rewards": [{"type": "exact_match"}, {"type": "tests.finetune.test_grpo:even_tokens"}],
                     "num_generations": 4, "max_completion_length": 8})
    base.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="trains from rewards on prompt records"):
        load_sweep_config(_write_sweep(tmp_path, base, objective="extrinsic.exact_match"))
    with pytest.raises(ConfigError, match="unknown reward 'exact'"):
        load_sweep_config(_write_sweep(tmp_path, base, objective="rewards.exact"))
    sweep = load_sweep_config(_write_sweep(tmp_path, base, n_trials=2, objective="rewards.even_tokens"))
    assert sweep.resolved_direction == "maximize"
    assert run_sweep(sweep)["states"] == {"complete": 2}
    study = optuna.load_study(study_name="t", storage=make_storage(f"sqlite:///{tmp_path / 'out' / 'study.db'}"))
    records, _ = read_prompt_records(tmp_path / "held.jsonl")
    for t in study.trials:
        adapter = Path(t.user_attrs["run_dir"]) / "adapter"
        model, tok = load_for_inference(adapter)
        scores, _ = score_reward_model(model, tok, records, label="check", reward_spec=resolve_rewards(
            "auto", adapter, None), max_new_tokens=8, batch_size=4)
        assert t.value == pytest.approx(scores["rewards"]["even_tokens"])


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["qlora", "full"])
def test_grpo_with_qlora_and_full_fine_tuning_against_a_reference(tiny_model, tmp_path, adapter):
    """QLoRA (4-bit base) and full fine-tuning with beta > 0: the reference is the starting adapter's
    frozen copy (QLoRA) or a second model (full); the KL is logged and the run exports what it trained."""
    pytest.importorskip("bitsandbytes")
    from finetune.config import load_config
    from finetune.training.recipe import train

    train_file = write_jsonl(tmp_path / "prompts.jsonl", price_prompts(16, 0))
    run = train(load_config(None, [
        f"model={tiny_model}", f"data.train={train_file}", f"output_dir={tmp_path / 'run'}", "method=grpo",
        f"adapter={adapter}", "grpo.rewards=[{type: 'tests.finetune.test_grpo:even_tokens'}]", "grpo.beta=0.1",
        "grpo.num_generations=4", "grpo.max_completion_length=8", "training.batch_size=4", "training.max_steps=3",
        "training.logging_steps=1", "training.learning_rate=5e-3", "training.report_to=[none]", "max_length=128",
        "seed=0"]))
    logged = [m for m in _metrics(run) if "loss" in m]
    assert len(logged) == 3 and all(math.isfinite(m["loss"]) and "kl" in m for m in logged), logged
    assert logged[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the first step's policy is the reference
    assert any(m["kl"] > 0 for m in logged[1:]), logged  # then it moves away from it
    if adapter == "full":
        assert (run / "model" / "config.json").is_file()
    else:
        info = json.loads((run / "adapter" / "finetune.json").read_text())
        assert info["adapter"] == "qlora" and not (run / "adapter" / "ref").exists()


def test_the_plan_counts_a_reference_only_with_beta(tiny_model, tmp_path):
    from finetune.plan.memory import GiB, make_plan, setup_from_config
    from finetune.plan.shapes import ModelShape

    train = write_jsonl(tmp_path / "p.jsonl", price_prompts(4, 0))
    shape = ModelShape.from_config({"model_type": "llama", "hidden_size": 512, "intermediate_size": 1024,
                                    "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 8,
                                    "vocab_size": 32000, "max_position_embeddings": 2048}, "small")

    def names(*over):
        s = setup_from_config(_cfg(tiny_model, train, tmp_path, *over), device="gpu", device_memory=80 * GiB)
        return {x.name for x in make_plan(shape, s, alternatives=False).lines}

    assert not any("reference" in n for n in names() | names("adapter=full"))
    assert "reference adapter (GRPO, frozen)" in names("grpo.beta=0.04")
    assert "reference model (GRPO, frozen)" in names("grpo.beta=0.04", "adapter=full")


@pytest.mark.slow
def test_a_killed_grpo_run_resumes_from_its_checkpoint(tiny_model, tmp_path):
    import os
    import subprocess
    import sys

    import yaml

    from tests.finetune.test_resume import kill_when_saved

    out = tmp_path / "run"
    cfg = {"model": str(tiny_model), "output_dir": str(out), "seed": 0, "max_length": 128, "method": "grpo",
           "data": {"train": str(write_jsonl(tmp_path / "p.jsonl", price_prompts(64, 0)))},
           "grpo": {"rewards": [{"type": "tests.finetune.test_grpo:even_tokens"}], "num_generations": 4,
                    "max_completion_length": 8},
           "training": {"max_steps": 40, "batch_size": 4, "learning_rate": 1e-3, "save_steps": 10,
                        "save_total_limit": 2, "logging_steps": 1, "report_to": ["none"]},
           "lora": {"r": 4}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "finetune", "train", str(path)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}  # the reward's module
    ckpt = out / "checkpoints"
    kill_when_saved(cmd, ckpt / "checkpoint-10", env=env, poll_s=0.02)
    killed_at = max(json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines() if ln)
    assert killed_at < 40 and not (out / "adapter").exists()
    done = subprocess.run([*cmd, "resume=true"], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Resuming from" in done.stdout
    logs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln]
    steps = [m["step"] for m in logs if "loss" in m]
    assert steps == list(range(1, 41)), steps
    assert all("reward" in m and "rollout/tokens_per_s" in m for m in logs if "loss" in m)
    assert json.loads((ckpt / "checkpoint-40" / "trainer_state.json").read_text())["global_step"] == 40
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_evaluation_during_a_grpo_run_scores_rewards_and_keeps_the_best(tiny_model, tmp_path):
    from finetune.config import load_config
    from finetune.training.recipe import train

    run = train(load_config(None, [
        f"model={tiny_model}", f"data.train={write_jsonl(tmp_path / 'p.jsonl', price_prompts(16, 0))}",
        f"data.eval={write_jsonl(tmp_path / 'e.jsonl', price_prompts(4, 5))}", f"output_dir={tmp_path / 'run'}",
        "method=grpo", "grpo.rewards=[{type: 'tests.finetune.test_grpo:even_tokens'}]", "grpo.num_generations=4",
        "grpo.max_completion_length=8", "training.batch_size=4", "training.max_steps=4", "training.eval_steps=2",
        "training.logging_steps=1", "training.learning_rate=5e-3", "training.report_to=[none]", "max_length=128",
        "seed=0"]))
    evals = [m for m in _metrics(run) if "eval_reward" in m]
    assert [m["step"] for m in evals] == [2, 4], evals
    state = json.loads(next((run / "checkpoints").glob("checkpoint-4")).joinpath("trainer_state.json").read_text())
    best = max(evals, key=lambda m: m["eval_reward"])
    assert state["best_metric"] == pytest.approx(best["eval_reward"])  # the higher reward is the best
    assert state["best_model_checkpoint"].endswith(f"checkpoint-{best['step']}")


def test_the_plans_batch_is_the_longest_prompt_in_every_row(tiny_model, tmp_path):
    """A run of whole epochs draws every prompt: its widest micro-batch holds the longest one, in every row."""
    from finetune.data.cache import prepared_split
    from finetune.models.loading import load_tokenizer
    from finetune.plan.command import run_longest_batch

    rows = price_prompts(12, 0)
    rows[5]["messages"][-2]["content"] += " and more words" * 4
    train = write_jsonl(tmp_path / "p.jsonl", rows)
    cfg = _cfg(tiny_model, train, tmp_path, "training.batch_size=8")
    ds, stats, _ = prepared_split(cfg, load_tokenizer(str(tiny_model)), str(train))
    assert stats.kept == 12
    lengths = ds.data.column("length").to_numpy()
    batch = run_longest_batch(cfg, lengths)
    longest = int(lengths.argmax())
    assert (batch.rows, batch.row_tokens) == (8, int(lengths.max())) and batch.exact and longest in batch.ids
    assert ds[longest]["line"] == 6 and int(lengths.max()) == len(decode_row_of(ds, longest)) + 16


def test_the_plan_replays_the_prompts_each_generation_draws(tiny_model, tmp_path, monkeypatch):
    """The plan's replay of TRL's sampler (finetune.plan.batches.rollout_generations) is the order the run
    generates in: over an epoch boundary, grad_accum 2, the run's seed; and its widest micro-batch is
    the longest prompt of those generations plus the completion room."""
    import numpy as np

    from finetune.config import load_config
    from finetune.data.cache import prepared_split
    from finetune.methods.grpo_trainer import KitGRPOTrainer
    from finetune.models.loading import load_tokenizer
    from finetune.plan.batches import rollout_generations
    from finetune.plan.command import run_longest_batch
    from finetune.training.recipe import train

    rows = price_prompts(12, 0)
    for i, r in enumerate(rows):  # lengths that differ, so the widest generation is one of them
        r["messages"][-2]["content"] += " please" * (i // 3)
    train_file = write_jsonl(tmp_path / "p.jsonl", rows)
    seen: list[list[str]] = []
    original = KitGRPOTrainer._generate_and_score_completions

    def record(self, inputs):
        seen.append([r["prompt"] for r in inputs])
        return original(self, inputs)

    monkeypatch.setattr(KitGRPOTrainer, "_generate_and_score_completions", record)
    over = [f"model={tiny_model}", f"data.train={train_file}", f"output_dir={tmp_path / 'run'}", "method=grpo",
            "grpo.rewards=[{type: 'tests.finetune.test_grpo:even_tokens'}]", "grpo.num_generations=4",
            "grpo.max_completion_length=8", "training.batch_size=4", "training.grad_accum=2", "training.max_steps=8",
            "training.logging_steps=4", "training.report_to=[none]", "max_length=128", "seed=3"]
    train(load_config(None, over))
    cfg = load_config(None, over)
    ds, stats, _ = prepared_split(cfg, load_tokenizer(str(tiny_model)), str(train_file))
    assert stats.kept == 12
    prompts = ds["prompt"]
    # 12 prompts, 2 per generation (4 rows x 2 micro-batches / 4 completions): 6 generations an epoch;
    # 8 steps x 2 micro-batches = 8 generations, the last two in the second epoch
    replay = list(rollout_generations(len(ds), batch_size=4, grad_accum=2, group=4, seed=3, micro_batches=16))
    assert [(e, i) for e, i, _ in replay] == [(0, 0), (0, 2), (0, 4), (0, 6), (0, 8), (0, 10), (1, 0), (1, 2)]
    assert seen == [[prompts[i] for i in rows[0]] for _, _, rows in replay]
    lengths = ds.data.column("length").to_numpy()
    batch = run_longest_batch(cfg, lengths)
    widest = max(int(lengths[rows[0]].max()) for _, _, rows in replay)
    assert (batch.rows, batch.row_tokens, batch.trained_tokens) == (4, widest, 4 * 8) and batch.exact
    assert widest < int(lengths.max()) or set(batch.ids) & {int(np.argmax(lengths))}


def decode_row_of(ds, i):
    from finetune.data.prompts import decode_row

    return decode_row(ds[i])["prompt_ids"]
