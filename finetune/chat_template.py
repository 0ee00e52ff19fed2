"""The chat template and the loss masks: the ONE place that turns messages into token ids + labels.

Training, `finetune preview`, evaluation (the same tokens are scored) and inference (the same
template is applied) all call this module, so a model is never trained on one format and served
with another.

Masks are computed from the rendered text, not from `{% generation %}` markers, because most real
models' templates have none: for assistant turn i the trained span is
``render(messages[:i+1])[len(render(messages[:i], add_generation_prompt=True)):]`` with trailing
whitespace removed, i.e. the assistant content plus the template's end-of-turn token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "CHATML_TEMPLATE",
    "ChatFormatError",
    "EncodedExample",
    "encode_chat",
    "ensure_chat_template",
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
    """Install `template` (or keep the tokenizer's own, or fall back to ChatML) and return it."""
    if template:
        tokenizer.chat_template = template
    elif not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML_TEMPLATE
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


def _render(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def render_prompt(tokenizer: Any, messages: list[dict]) -> str:
    """The text a model sees before it generates the next assistant turn."""
    if messages and messages[-1].get("role") == "assistant":
        messages = messages[:-1]
    return _render(tokenizer, messages, add_generation_prompt=True)


def assistant_spans(tokenizer: Any, messages: list[dict], loss_on: LossOn) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans that are trained."""
    text = _render(tokenizer, messages)
    if loss_on == "all":
        return text, [(0, len(text.rstrip()))]
    spans = []
    idx = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if loss_on == "last_assistant":
        idx = idx[-1:]
    for i in idx:
        prefix = _render(tokenizer, messages[:i], add_generation_prompt=True)
        # The last message's "conversation so far" is the whole conversation: one render fewer
        # for every example that ends on its assistant turn (nearly all of them).
        upto = text if i == len(messages) - 1 else _render(tokenizer, messages[: i + 1])
        if not text.startswith(upto) or not upto.startswith(prefix):
            raise ChatFormatError(
                "the chat template does not render conversations prefix-consistently, so assistant "
                "turns cannot be located; set `chat_template` in the config to a template that does"
            )
        end = len(upto.rstrip())
        spans.append((len(prefix), end))
    return text, spans


def encode_chat(
    tokenizer: Any,
    messages: list[dict],
    *,
    max_length: int | None = None,
    loss_on: LossOn = "assistant",
) -> EncodedExample:
    """Token ids and labels for one conversation; labels are IGNORE_INDEX outside trained spans."""
    text, spans = assistant_spans(tokenizer, messages, loss_on)
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


def encode_completion(tokenizer: Any, prompt: list[dict], completion: list[dict]) -> EncodedCompletion:
    """Token ids of `prompt` (rendered up to the generation prompt) and of `completion` after it.

    The same rule as SFT's loss masks (`assistant_spans`): the completion is the rendered text of
    prompt + completion after the rendered prompt with its generation prompt, with trailing
    whitespace removed, so it ends on the template's end-of-turn token, which is scored. The text is
    tokenized once, whole: a token that straddles the prompt/completion boundary belongs to the
    completion (it carries completion characters), as in SFT's masks."""
    text = _render(tokenizer, prompt + completion)
    prefix = _render(tokenizer, prompt, add_generation_prompt=True)
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
