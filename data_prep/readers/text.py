"""Plain text / Markdown documents and speaker-labelled transcripts."""

from __future__ import annotations

import re

from data_prep.record import Message

DEFAULT_SPEAKERS: dict[str, str] = {
    "customer": "user",
    "user": "user",
    "client": "user",
    "caller": "user",
    "human": "user",
    "q": "user",
    "question": "user",
    "agent": "assistant",
    "assistant": "assistant",
    "support": "assistant",
    "representative": "assistant",
    "rep": "assistant",
    "bot": "assistant",
    "a": "assistant",
    "answer": "assistant",
    "system": "system",
}

# "Customer: hi", "**Agent:** hello", "[00:01:02] Agent: ..." -- label of at most 4 words
_LABEL = re.compile(
    r"^\s*(?:\[[\d:.,]+\]\s*)?(?:\*\*)?([A-Za-z][\w .'-]{0,40}?)(?:\*\*)?\s*:(?:\*\*)?\s+(.*)$"
)
_CONV_BREAK = re.compile(r"^\s*(?:-{3,}|={3,}|\*{3,})\s*$")


def _label(line: str) -> tuple[str, str] | None:
    m = _LABEL.match(line)
    if not m or len(m.group(1).split()) > 4:
        return None
    return m.group(1).strip().lower(), m.group(2)


def looks_like_transcript(text: str, speakers: dict[str, str]) -> bool:
    """At least two labelled lines from known speakers, covering both a user and an assistant."""
    roles = set()
    for line in text.split("\n")[:400]:
        lab = _label(line)
        if lab and lab[0] in speakers:
            roles.add(speakers[lab[0]])
    return {"user", "assistant"} <= roles


def parse_transcript(text: str, speakers: dict[str, str]) -> list[tuple[int, list[Message] | str]]:
    """Conversations of a transcript as (first line number, messages) or (line number, reason).

    Unlabelled lines continue the current turn; consecutive turns of one role are merged;
    `---` on its own line starts a new conversation. An unknown speaker label rejects its
    conversation, since guessing the role would put words in the wrong mouth.
    """
    out: list[tuple[int, list[Message] | str]] = []
    messages: list[Message] = []
    start, error = 1, None

    def flush(lineno: int) -> None:
        nonlocal messages, error, start
        if error:
            out.append((start, error))
        elif messages:
            out.append((start, [{"role": m["role"], "content": m["content"].strip()} for m in messages]))
        messages, error, start = [], None, lineno + 1

    for i, line in enumerate(text.split("\n"), start=1):
        if _CONV_BREAK.match(line):
            flush(i)
            continue
        lab = _label(line)
        if lab and lab[0] in speakers:
            role, content = speakers[lab[0]], lab[1]
            if messages and messages[-1]["role"] == role:
                messages[-1]["content"] += "\n" + content
            else:
                messages.append({"role": role, "content": content})
        elif lab and not messages and not error:
            error = f"unmapped_speaker: {lab[0]!r} (add it to transcript.speakers)"
        elif messages:
            messages[-1]["content"] += "\n" + line
        elif line.strip() and not error:
            # text before the first label: keep it as a system preamble would invent intent
            error = f"text_before_first_speaker: line {i}"
    flush(len(text.split("\n")))
    return out
