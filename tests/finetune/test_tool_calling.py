"""Tool calling and per-message weights in training: what the loss masks train, the error for a
template that cannot render tools, the parser and the metrics of tool calls, the reply type."""

from __future__ import annotations

import json

import pytest

from finetune.data.chat_template import (
    CHATML_TEMPLATE,
    IGNORE_INDEX,
    ChatFormatError,
    encode_chat,
    parse_tool_calls,
    render_prompt,
)
from tests.conftest import make_chat_examples, write_jsonl

TOOLS = [
    {"type": "function", "function": {"name": "weather", "description": "Weather in a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "get_price", "description": "Price of an item",
                                      "parameters": {"type": "object", "properties": {"item": {"type": "string"}}}}},
]
CALL_OSLO = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
CALL_MUG = {"id": "c2", "type": "function", "function": {"name": "get_price", "arguments": '{"item": "mug"}'}}
TOOL_CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Oslo, and the price of the mug?"},
    {"role": "assistant", "content": "Checking.", "tool_calls": [CALL_OSLO, CALL_MUG]},
    {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    {"role": "tool", "tool_call_id": "c2", "content": "$9"},
    {"role": "assistant", "content": "Sunny; the mug is $9."},
]
WEIGHTED = [
    {"role": "user", "content": "Price of the mug?"},
    {"role": "assistant", "content": "No idea.", "weight": 0},
    {"role": "user", "content": "Try again."},
    {"role": "assistant", "content": "It is $9.", "weight": 1},
]


@pytest.fixture(scope="module")
def tok(tiny_model):
    from finetune.models.loading import load_tokenizer

    return load_tokenizer(str(tiny_model))


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory, chat_data):
    """A tiny model whose tokenizer also saw tool chats as the template renders them (so that a
    tool chat fits its positions), as `finetune tiny-model --corpus` builds it."""
    from finetune.tiny import build_tiny_model

    d = tmp_path_factory.mktemp("tool_model")
    corpus = write_jsonl(d / "tool_chats.jsonl", [{"tools": TOOLS, "messages": TOOL_CHAT}] * 20)
    return build_tiny_model(d / "model", [chat_data["train"], corpus], vocab_size=512, hidden_size=64, layers=2,
                            heads=4, kv_heads=2, max_positions=1024)


def _trained_text(tok, enc) -> str:
    return "".join(tok.decode([i]) for i, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX)


def test_trained_tokens_are_the_assistant_turns_with_their_calls_never_the_tool_results(tok):
    enc = encode_chat(tok, TOOL_CHAT, tools=TOOLS)
    calls = ('Checking.\n<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
             '\n<tool_call>\n{"name": "get_price", "arguments": {"item": "mug"}}\n</tool_call><|im_end|>')
    assert _trained_text(tok, enc) == calls + "Sunny; the mug is $9.<|im_end|>"
    # The declared tools, the results and the prompts are in the input, untrained.
    text = tok.decode(enc.input_ids)
    assert '"description": "Weather in a city"' in text and "<tool_response>\nsunny\n</tool_response>" in text
    assert "sunny" not in _trained_text(tok, enc) and "$9\n" not in _trained_text(tok, enc)
    # last_assistant trains the final answer only; weights and loss_on=all are exercised below.
    assert _trained_text(tok, encode_chat(tok, TOOL_CHAT, tools=TOOLS, loss_on="last_assistant")) == \
        "Sunny; the mug is $9.<|im_end|>"


def test_a_call_only_turn_is_trained_from_its_first_markup_token(tok):
    msgs = [{"role": "user", "content": "Weather in Oslo?"}, {"role": "assistant", "content": None,
                                                               "tool_calls": [CALL_OSLO]}]
    enc = encode_chat(tok, msgs, tools=TOOLS)
    assert _trained_text(tok, enc) == \
        '<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>'
    # Inference's prompt is the training text up to the first trained character.
    assert tok.decode(enc.input_ids).startswith(render_prompt(tok, msgs, TOOLS))
    assert render_prompt(tok, msgs, TOOLS).endswith("<|im_start|>assistant\n")


def test_a_weight_0_assistant_turn_trains_no_token(tok):
    enc = encode_chat(tok, WEIGHTED)
    assert _trained_text(tok, enc) == "It is $9.<|im_end|>"
    unweighted = encode_chat(tok, [{k: v for k, v in m.items() if k != "weight"} for m in WEIGHTED])
    assert _trained_text(tok, unweighted) == "No idea.<|im_end|>It is $9.<|im_end|>"
    assert enc.input_ids == unweighted.input_ids  # the turn stays in the context
    # Under loss_on=all too: the whole sequence but the weight-0 turn.
    every = _trained_text(tok, encode_chat(tok, WEIGHTED, loss_on="all"))
    assert "No idea." not in every and "It is $9.<|im_end|>" in every and "Try again." in every
    # last_assistant is the last turn that may be trained.
    flipped = [WEIGHTED[0], {**WEIGHTED[1], "weight": 1}, WEIGHTED[2], {**WEIGHTED[3], "weight": 0}]
    assert _trained_text(tok, encode_chat(tok, flipped, loss_on="last_assistant")) == "No idea.<|im_end|>"


def test_the_tool_template_renders_tool_free_chats_exactly_as_chatml(tok):
    from finetune.data.chat_template import CHATML_TOOLS_TEMPLATE

    assert tok.chat_template == CHATML_TOOLS_TEMPLATE  # the tiny model's template
    for ex in make_chat_examples(40, seed=5) + [{"messages": WEIGHTED}]:
        ours = tok.apply_chat_template(ex["messages"], tokenize=False)
        assert ours == tok.apply_chat_template(ex["messages"], tokenize=False, chat_template=CHATML_TEMPLATE)


def test_chatml_without_tools_is_one_clear_error_before_training(tool_model, tmp_path):
    from finetune.config import load_config
    from finetune.data.files import DataError
    from finetune.models.loading import load_tokenizer
    from finetune.training.recipe import train

    plain = load_tokenizer(str(tool_model), chat_template="chatml")
    with pytest.raises(ChatFormatError, match="`chatml`.*cannot render it: it ignores `tools`.*chat_template: chatml_tools"):
        encode_chat(plain, TOOL_CHAT, tools=TOOLS)
    # A template that renders the declared tools but drops the calls is caught by the probe too.
    half = "{% for t in tools or [] %}{{ t | tojson }}{% endfor %}" + CHATML_TEMPLATE
    custom = load_tokenizer(str(tool_model), chat_template=half)
    with pytest.raises(ChatFormatError, match="rendering a tool call fails|drops an assistant's `tool_calls`"):
        encode_chat(custom, TOOL_CHAT, tools=TOOLS)

    short = [{"role": "user", "content": "Weather in Oslo?"},
             {"role": "assistant", "content": None, "tool_calls": [CALL_OSLO]}]
    data = write_jsonl(tmp_path / "d" / "train.jsonl", make_chat_examples(8) + [{"tools": TOOLS, "messages": short}])
    cfg = load_config(None, [f"model={tool_model}", f"data.train={data}", f"output_dir={tmp_path / 'run'}",
                             "chat_template=chatml", "training.report_to=[none]", "max_length=1024"])
    with pytest.raises(DataError, match=rf"{data}:9: these examples use tool calling, and `chatml`"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any training step
    # The same config with the kit's tool template trains (the first steps of it).
    cfg = load_config(None, [f"model={tool_model}", f"data.train={data}", f"output_dir={tmp_path / 'run2'}",
                             "chat_template=chatml_tools", "training.report_to=[none]", "max_length=1024",
                             "training.max_steps=1", "training.batch_size=4"])
    assert (train(cfg) / "adapter").is_dir()


def test_preview_shows_the_masks_of_tool_calling_examples(tool_model, tmp_path):
    from finetune.config import load_config
    from finetune.data.preview import preview_examples

    data = write_jsonl(tmp_path / "train.jsonl", [{"tools": TOOLS, "messages": TOOL_CHAT}, {"messages": WEIGHTED}])
    cfg = load_config(None, [f"model={tool_model}", f"data.train={data}", f"output_dir={tmp_path / 'r'}",
                             "max_length=1024"])
    first, second = preview_examples(cfg, n=2)
    assert not first["truncated"]
    trained = "".join(t["text"] for t in first["tokens"] if t["trained"])
    assert trained.startswith("Checking.\n<tool_call>\n") and "sunny" not in trained
    assert "".join(t["text"] for t in second["tokens"] if t["trained"]) == "It is $9.<|im_end|>"


def test_parse_tool_calls_reads_the_template_format_and_counts_what_does_not_parse():
    text = ('Let me check.\n<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_price", "arguments": {"item": "mug"}}\n</tool_call>')
    p = parse_tool_calls(text)
    assert p.content == "Let me check." and p.invalid == []
    assert [c["function"]["name"] for c in p.tool_calls] == ["weather", "get_price"]
    assert json.loads(p.tool_calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    assert [c["id"] for c in p.tool_calls] == ["call_0", "call_1"]
    # chat() numbers on from the calls already in the conversation: every id names one call
    assert [c["id"] for c in parse_tool_calls(text, first_id=2).tool_calls] == ["call_2", "call_3"]
    # Cut off by max_new_tokens, broken JSON, no call at all, Llama-3.1-style bare JSON.
    assert parse_tool_calls('<tool_call>\n{"name": "weather", "arguments": {"city": "Os').invalid
    assert parse_tool_calls('<tool_call>{"name": "weather", "arguments": [1]}</tool_call>').invalid
    assert parse_tool_calls("It is sunny.").tool_calls == [] and parse_tool_calls("It is sunny.").content == "It is sunny."
    bare = parse_tool_calls('{"name": "weather", "parameters": {"city": "Oslo"}}')
    assert bare.content == "" and bare.tool_calls[0]["function"]["arguments"] == '{"city": "Oslo"}'


def test_tool_call_metrics_ignore_key_order_and_call_order():
    from finetune.eval.metrics import score_tool_calls

    def call(name, args):
        return {"type": "function", "function": {"name": name, "arguments": json.dumps(args)}}

    ref = [call("convert", {"amount": 5, "from": "USD", "to": "EUR"})]
    preds = [
        ([call("convert", {"to": "EUR", "amount": 5.0, "from": "USD"})], []),    # key order, 5 == 5.0
        ([call("convert", {"amount": 5, "from": "USD", "to": "GBP"})], []),      # right function, wrong argument
        ([call("weather", {"city": "Oslo"})], []),                               # wrong function
        ([], ['{"name": "convert", "arguments": {"amount": 5']),                # a call that does not parse
    ]
    per, agg = score_tool_calls(preds, [ref] * 4)
    assert [r["tool_name_accuracy"] for r in per] == [1, 1, 0, 0]
    assert [r["tool_arguments_exact_match"] for r in per] == [1, 0, 0, 0]
    assert agg["tool_name_accuracy"] == 0.5 and agg["tool_arguments_exact_match"] == 0.25
    assert (agg["n_tool_references"], agg["n_no_tool_call"], agg["n_invalid_tool_call"]) == (4, 1, 1)
    parallel = [call("weather", {"city": "Oslo"}), call("weather", {"city": "Lima"})]
    per, _ = score_tool_calls([(parallel[::-1], []), (parallel[:1], [])], [parallel, parallel])
    assert [r["tool_arguments_exact_match"] for r in per] == [1, 0]


def test_chat_reply_is_the_text_callers_had_plus_the_parsed_calls():
    from finetune.inference.load import ChatReply

    plain = ChatReply("It is $9.")
    assert plain == "It is $9." and isinstance(plain, str) and plain.tool_calls == []
    assert plain.message() == {"role": "assistant", "content": "It is $9."}
    text = '<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    parsed = parse_tool_calls(text)
    reply = ChatReply(text, parsed.content, parsed.tool_calls)
    assert reply == text and reply.content == ""
    assert reply.message() == {"role": "assistant", "content": None, "tool_calls": parsed.tool_calls}


@pytest.mark.slow
def test_eval_scores_tool_call_references_next_to_the_text_metrics(tool_model, tmp_path, monkeypatch):
    """The wiring of `finetune eval`: what the model generates (replaced here by fixed replies, so
    the figures are known) is parsed in the template's format and scored against the references."""
    import finetune.inference.load as inference
    from finetune.eval.evaluation import evaluate

    short = TOOL_CHAT[:2]  # system + user; each row adds its reference turn
    lima = {**CALL_OSLO, "function": {"name": "weather", "arguments": '{"city": "Lima"}'}}
    rows = [
        {"tools": TOOLS, "messages": [*short, {"role": "assistant", "content": None, "tool_calls": [CALL_OSLO]}]},
        {"tools": TOOLS, "messages": [*short, {"role": "assistant", "content": None, "tool_calls": [lima]}]},
        {"tools": TOOLS, "messages": [*short, {"role": "assistant", "content": None, "tool_calls": [CALL_MUG]}]},
        {"messages": [{"role": "user", "content": "Price of the mug?"}, {"role": "assistant", "content": "$9"}]},
    ]
    data = write_jsonl(tmp_path / "test.jsonl", rows)
    replies = ['<tool_call>\n{"arguments": {"city": "Oslo"}, "name": "weather"}\n</tool_call>',  # key order
               '<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>',  # wrong city
               'The mug costs $9.',                                                             # no call
               "$9"]
    seen = {}

    def fake_generate(model, tokenizer, conversations, *, tools=None, **kw):
        seen["tools"] = tools
        return replies[:len(conversations)]

    monkeypatch.setattr(inference, "generate_replies", fake_generate)
    report = evaluate(model=str(tool_model), data=data, output=tmp_path / "e", max_new_tokens=4, max_length=1024)
    ext = report["models"]["base"]["extrinsic"]
    assert ext["tool_name_accuracy"] == pytest.approx(2 / 3) and ext["tool_arguments_exact_match"] == pytest.approx(1 / 3)
    assert (ext["n"], ext["n_tool_references"], ext["n_no_tool_call"], ext["exact_match"]) == (4, 3, 1, 1.0)
    assert seen["tools"] == [TOOLS, TOOLS, TOOLS, None]  # the prompts declared each record's tools
    preds = [json.loads(x) for x in (tmp_path / "e" / "predictions.jsonl").read_text().splitlines()]
    assert [p["line"] for p in preds] == [1, 2, 3, 4]
    assert preds[0]["reference"] == [CALL_OSLO] and preds[0]["tool_calls"][0]["function"]["name"] == "weather"
    assert preds[0]["tools"] == TOOLS and preds[3]["reference"] == "$9"
    md = (tmp_path / "e" / "report.md").read_text()
    assert "| tool_name_accuracy |" in md and "| exact_match |" in md
    # Scored on the tokens training trains: the calls (and the text answer), not the tools block.
    assert report["models"]["base"]["intrinsic"]["n_invalid"] == 0
    # A template that cannot render the set's tools is refused, naming the line and the fix.
    import shutil

    from finetune.models.loading import load_tokenizer

    plain_dir = tmp_path / "plain"
    load_tokenizer(str(tool_model), chat_template="chatml").save_pretrained(plain_dir)
    for f in tool_model.iterdir():
        if not (plain_dir / f.name).exists():
            shutil.copy(f, plain_dir / f.name)
    with pytest.raises(ChatFormatError, match=rf"{data}:1: these examples use tool calling.*chatml_tools"):
        evaluate(model=str(plain_dir), data=data, output=tmp_path / "e2", max_new_tokens=4)


def test_tiny_tokenizer_gives_the_tools_block_lines_one_token_each_and_not_the_messages(tool_model):
    from finetune.models.loading import load_tokenizer

    tok = load_tokenizer(str(tool_model))
    added = set(tok.get_added_vocab())
    assert "You may call one or more functions to assist with the user query." in added
    assert json.dumps(TOOLS[0]) in added  # a declared tool's JSON line
    # Every corpus chat repeats its messages too, but message text is tokenized as any text.
    for m in TOOL_CHAT:
        if m["content"]:
            assert m["content"] not in added
    assert not any("Oslo" in t or "system" == t for t in added)
    enc = encode_chat(tok, TOOL_CHAT, tools=TOOLS)
    assert _trained_text(tok, enc).startswith("Checking.\n<tool_call>\n")
