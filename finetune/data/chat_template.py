"""The chat template and the loss masks: the ONE place that turns messages into token ids + labels.

Training, `finetune preview`, evaluation (the same tokens are scored) and inference (the same
template is applied) all call this module, so a model is never trained on one format and served
with another. The tool-call format lives here too: the kit's tool template (CHATML_TOOLS_TEMPLATE)
and the parser of what a model generates in it (`parse_tool_calls`).

Masks are computed from the rendered text, not from `{% generation %}` markers, because most real
models' templates have none: for assistant turn i the trained span is
``render(messages[:i+1])[len(render(messages[:i], add_generation_prompt=True)):]`` with trailing
whitespace removed, i.e. the assistant content and tool calls plus the template's end-of-turn
token. Tool results are never trained (they are not assistant turns), nor is an assistant turn
with `"weight": 0`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from kitcore.schema import uses_tools

__all__ = [
    "CHATML_TEMPLATE",
    "CHATML_TOOLS_TEMPLATE",
    "TEMPLATES",
    "ChatFormatError",
    "EncodedExample",
    "ParsedReply",
    "check_renders_tools",
    "encode_chat",
    "ensure_chat_template",
    "parse_tool_calls",
    "render_chat",
    "render_prompt",
    "end_of_turn_token",
]

IGNORE_INDEX = -100

# ChatML, the documented default when a tokenizer ships no template. `<|im_end|>` ends every turn.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# ChatML with tool calling, in the format of Qwen2.5's template (Hermes function calling): the
# declared tools go into the system turn as JSON lines inside <tools></tools>, an assistant's
# calls follow its text as `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, and
# consecutive tool results share one user turn, each inside <tool_response></tool_response>.
# Without tools it renders exactly what CHATML_TEMPLATE renders, so switching to it changes no
# token of a tool-free dataset. Unlike Qwen's, it adds no default system prompt.
CHATML_TOOLS_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, "
    "\"arguments\": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and loop.first and tools %}"
    "{%- elif message['role'] == 'assistant' and message.tool_calls %}"
    "{{- '<|im_start|>assistant' }}"
    "{%- if message['content'] %}{{- '\\n' + message['content'] }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- set fn = tool_call.function if tool_call.function is defined else tool_call %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + fn['name'] + '\", \"arguments\": ' }}"
    "{%- if fn['arguments'] is string %}{{- fn['arguments'] }}{%- else %}{{- fn['arguments'] | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# The templates the kit ships, by the name a config gives in `chat_template`.
TEMPLATES = {"chatml": CHATML_TEMPLATE, "chatml_tools": CHATML_TOOLS_TEMPLATE}

LossOn = Literal["assistant", "last_assistant", "all"]


class ChatFormatError(ValueError):
    """An example cannot be rendered or masked; the message says which and why."""


@dataclass
class EncodedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where the token is not trained
    truncated: bool
    n_trained: int
    # Byte length of the text of the trained tokens (for bits per byte).
    trained_bytes: int


def ensure_chat_template(tokenizer: Any, template: str | None = None) -> str:
    """Install `template` (a Jinja template, or the name of one in TEMPLATES), or keep the
    tokenizer's own, or fall back to ChatML; return it."""
    if template:
        tokenizer.chat_template = TEMPLATES.get(template, template)
    elif not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML_TEMPLATE
    if tokenizer.chat_template in TEMPLATES.values():
        missing = [t for t in ("<|im_start|>", "<|im_end|>") if t not in tokenizer.get_vocab()]
        if missing:
            # Without these as single tokens the end of a turn is several pieces and generation
            # cannot stop on it reliably.
            tokenizer.add_special_tokens({"additional_special_tokens": missing})
    return tokenizer.chat_template


def end_of_turn_token(tokenizer: Any) -> str | None:
    """The token that closes an assistant turn in this template (ChatML: `<|im_end|>`)."""
    probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "\x00"}]
    text = tokenizer.apply_chat_template(probe, tokenize=False)
    tail = text.split("\x00", 1)[1]
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids)
    for i in ids:
        if i in special:
            return tokenizer.convert_ids_to_tokens(i)
    return tokenizer.eos_token


def _template_messages(messages: list[dict]) -> list[dict]:
    """Messages as Hugging Face chat templates take them: a tool call's `arguments` as an object
    (Llama 3.1's, Qwen2.5's and Mistral's templates serialize it with `tojson`), not the JSON
    string of OpenAI's format. The schema has checked that it parses."""
    if not any(m.get("tool_calls") for m in messages):
        return messages
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                fn = dict(c["function"])
                if isinstance(fn.get("arguments"), str):
                    fn["arguments"] = json.loads(fn["arguments"])
                calls.append({**c, "function": fn})
            m = {**m, "tool_calls": calls}
        out.append(m)
    return out


def _render(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = False,
            tools: list | None = None) -> str:
    return tokenizer.apply_chat_template(
        _template_messages(messages), tools=tools or None, tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )


# A conversation that uses every part of tool calling, each with a marker no template writes itself.
_PROBE_TOOLS = [{"type": "function", "function": {
    "name": "probe_lookup", "description": "probe_description",
    "parameters": {"type": "object", "properties": {"probe_key": {"type": "string"}}, "required": ["probe_key"]}}}]
_PROBE_CALL = [{"role": "user", "content": "probe_question"},
               {"role": "assistant", "content": None, "tool_calls": [{"id": "call_probe", "type": "function", "function": {
                   "name": "probe_lookup", "arguments": '{"probe_key": "probe_value"}'}}]}]
_PROBE_RESULT = [{"role": "tool", "tool_call_id": "call_probe", "content": "probe_result"},
                 {"role": "assistant", "content": "probe_answer"}]
_TOOL_SUPPORT: dict[str, str | None] = {}  # template -> why it cannot render tools (None: it can)


def template_name(tokenizer: Any) -> str:
    """How an error names the tokenizer's template: its name in TEMPLATES, or where it came from."""
    for name, text in TEMPLATES.items():
        if tokenizer.chat_template == text:
            extra = " (the kit's ChatML fallback for tokenizers without a template)" if name == "chatml" else ""
            return f"`{name}`{extra}"
    return f"the chat template of {getattr(tokenizer, 'name_or_path', '') or 'the tokenizer'}"


def _why_no_tools(tokenizer: Any) -> str | None:
    """Render the probe; what the template leaves out (or the error it raises), None if nothing."""
    try:
        declared = _render(tokenizer, _PROBE_CALL[:1], add_generation_prompt=True, tools=_PROBE_TOOLS)
        if "probe_description" not in declared:
            return "it ignores `tools`: the declared functions never reach the model"
        called = _render(tokenizer, _PROBE_CALL, tools=_PROBE_TOOLS)
        if "probe_lookup" not in called[len(declared):] or "probe_value" not in called:
            return "it drops an assistant's `tool_calls`: the function name or arguments are not in its output"
        answered = _render(tokenizer, _PROBE_CALL + _PROBE_RESULT, tools=_PROBE_TOOLS)
        if "probe_result" not in answered:
            return "it drops `tool` messages: the tool results are not in its output"
    except Exception as exc:  # a template raises what it pleases (TypeError on null content, ...)
        return f"rendering a tool call fails ({type(exc).__name__}: {exc})"
    return None


def check_renders_tools(tokenizer: Any) -> None:
    """Raise ChatFormatError, naming the template and the fix, unless it renders tool declarations,
    tool calls and tool results (checked by rendering a probe conversation, once per template)."""
    key = str(tokenizer.chat_template)
    if key not in _TOOL_SUPPORT:
        _TOOL_SUPPORT[key] = _why_no_tools(tokenizer)
    why = _TOOL_SUPPORT[key]
    if why:
        raise ChatFormatError(
            f"these examples use tool calling, and {template_name(tokenizer)} cannot render it: {why}. "
            "Set `chat_template: chatml_tools` in the config (the kit's ChatML with a tools system block and "
            "calls as <tool_call>{json}</tool_call>, the Qwen2.5/Hermes format), or the model's own "
            "tool-capable template"
        )


def render_chat(tokenizer: Any, messages: list[dict], tools: list | None = None) -> str:
    """The whole conversation as the template renders it for training (what is tokenized)."""
    if uses_tools(messages, tools):
        check_renders_tools(tokenizer)
    return _render(tokenizer, messages, tools=tools)


def render_prompt(tokenizer: Any, messages: list[dict], tools: list | None = None) -> str:
    """The text a model sees before it generates the next assistant turn."""
    if messages and messages[-1].get("role") == "assistant":
        messages = messages[:-1]
    if uses_tools(messages, tools):
        check_renders_tools(tokenizer)
    return _render(tokenizer, messages, add_generation_prompt=True, tools=tools)


def assistant_spans(tokenizer: Any, messages: list[dict], loss_on: LossOn,
                    tools: list | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans that are trained.

    Assistant turns with `"weight": 0` are never trained, also under `loss_on="all"` (their span is
    cut out of the whole sequence); `last_assistant` is the last turn that may be trained."""
    text = render_chat(tokenizer, messages, tools)

    def turn_span(i: int) -> tuple[int, int]:
        prefix = _render(tokenizer, messages[:i], add_generation_prompt=True, tools=tools)
        # The last message's "conversation so far" is the whole conversation: one render fewer
        # for every example that ends on its assistant turn (nearly all of them).
        upto = text if i == len(messages) - 1 else _render(tokenizer, messages[: i + 1], tools=tools)
        if not text.startswith(upto) or not upto.startswith(prefix):
            raise ChatFormatError(
                "the chat template does not render conversations prefix-consistently, so assistant "
                "turns cannot be located; set `chat_template` in the config to a template that does"
            )
        return len(prefix), len(upto.rstrip())

    assistant = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    trained = [i for i in assistant if messages[i].get("weight", 1) != 0]
    if loss_on == "all":
        spans, start = [], 0
        for s, e in (turn_span(i) for i in assistant if i not in trained):
            spans.append((start, s))
            start = e
        spans.append((start, len(text.rstrip())))
        return text, [(s, e) for s, e in spans if e > s]
    if loss_on == "last_assistant":
        trained = trained[-1:]
    return text, [turn_span(i) for i in trained]


def encode_chat(
    tokenizer: Any,
    messages: list[dict],
    *,
    max_length: int | None = None,
    loss_on: LossOn = "assistant",
    tools: list | None = None,
) -> EncodedExample:
    """Token ids and labels for one conversation (with the record's `tools`, when it declares any);
    labels are IGNORE_INDEX outside trained spans."""
    text, spans = assistant_spans(tokenizer, messages, loss_on, tools)
    # The template already carries any BOS it wants; adding special tokens again would double it.
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    for t, (s, e) in enumerate(enc["offset_mapping"]):
        # A token is trained when its characters overlap a trained span.
        if e > s and any(s < se and e > ss for ss, se in spans):
            labels[t] = ids[t]
    truncated = False
    if max_length is not None and len(ids) > max_length:
        ids, labels, truncated = ids[:max_length], labels[:max_length], True
    # Labels are shifted inside the model: position t predicts token t, scored from logits t-1,
    # so the first token can never be trained.
    if labels:
        labels[0] = IGNORE_INDEX
    # Bytes of the characters the trained tokens cover (a union: byte-level BPE pieces of one
    # multi-byte character share its offsets).
    covered = bytearray(len(text))
    for t, lab in enumerate(labels):
        if lab != IGNORE_INDEX:
            s, e = enc["offset_mapping"][t]
            covered[s:e] = b"\x01" * (e - s)
    trained_bytes = sum(len(ch.encode("utf-8")) for ch, c in zip(text, covered) if c)
    n_trained = sum(1 for lab in labels if lab != IGNORE_INDEX)
    return EncodedExample(ids, labels, truncated, n_trained, trained_bytes)


@dataclass
class EncodedCompletion:
    """A prompt and one completion of it, as token ids (preference and unpaired data)."""

    prompt_ids: list[int]
    completion_ids: list[int]
    completion_bytes: int  # UTF-8 bytes of the completion's text (for per-byte figures)


def encode_completion(tokenizer: Any, prompt: list[dict], completion: list[dict],
                      tools: list | None = None) -> EncodedCompletion:
    """Token ids of `prompt` (rendered up to the generation prompt) and of `completion` after it.

    The same rule as SFT's loss masks (`assistant_spans`): the completion is the rendered text of
    prompt + completion after the rendered prompt with its generation prompt, with trailing
    whitespace removed, so it ends on the template's end-of-turn token, which is scored. `tools`
    (the record's declared functions) are rendered into both, as the template declares them. The text is
    tokenized once, whole: a token that straddles the prompt/completion boundary belongs to the
    completion (it carries completion characters), as in SFT's masks."""
    if uses_tools(prompt + completion, tools):
        check_renders_tools(tokenizer)
    text = _render(tokenizer, prompt + completion, tools=tools)
    prefix = _render(tokenizer, prompt, add_generation_prompt=True, tools=tools)
    if not text.startswith(prefix):
        raise ChatFormatError(
            "the chat template does not render the prompt as a prefix of prompt + completion, so the "
            "completion cannot be located; set `chat_template` in the config to a template that does"
        )
    end = len(text.rstrip())
    enc = tokenizer(text[:end], add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    # The first token whose characters reach past the prompt (zero-width tokens stay with the prompt).
    k = next((t for t, (s, e) in enumerate(enc["offset_mapping"]) if e > len(prefix) and e > s), len(ids))
    return EncodedCompletion(ids[:k], ids[k:], len(text[len(prefix):end].encode("utf-8")))


# ----------------------------------------------------------------------------------------------
# reading tool calls back out of generated text (the format CHATML_TOOLS_TEMPLATE trains)
# ----------------------------------------------------------------------------------------------
_TOOL_CALL_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.S)


@dataclass
class ParsedReply:
    """A generated assistant turn: its text and its tool calls in OpenAI's form (ids `call_N`,
    `arguments` as a JSON string); `invalid` holds the call blocks that are not a JSON object with
    a `name` and object `arguments` (a model that has not learned the format, or was cut off)."""

    content: str
    tool_calls: list[dict] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)


def _as_call(obj: Any) -> tuple[str, dict] | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))  # Llama 3.1 writes "parameters"
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    return (obj["name"], args) if isinstance(args, dict) else None


def parse_tool_calls(text: str, first_id: int = 0) -> ParsedReply:
    """The tool calls in a generated reply: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
    blocks (the kit's template, Qwen2.5, Hermes), or, when there is no such block, a reply that is
    one such JSON object and nothing else (Llama 3.1's JSON tool calling). An unterminated last
    block (generation stopped at max_new_tokens) is read up to the end. The calls get the ids
    `call_{first_id}`, `call_{first_id + 1}`, ..."""
    found: list[tuple[str, dict]] = []
    invalid: list[str] = []
    blocks = list(_TOOL_CALL_BLOCK.finditer(text))
    if blocks:
        for b in blocks:
            raw = b.group(1).strip()
            try:
                call = _as_call(json.loads(raw))
            except json.JSONDecodeError:
                call = None
            if call is None:
                invalid.append(raw)
            else:
                found.append(call)
        content = _TOOL_CALL_BLOCK.sub("", text).strip()
    else:
        content = text.strip()
        if content.startswith("{"):
            try:
                call = _as_call(json.loads(content))
            except json.JSONDecodeError:
                call = None
            if call is not None:
                found, content = [call], ""
    calls = [{"id": f"call_{k}", "type": "function",
              "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}
             for k, (name, args) in enumerate(found, start=first_id)]
    return ParsedReply(content, calls, invalid)
