"""The record-level steps of a build, in pipeline order: clean -> redact -> chat filter -> assemble -> dedup."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from data_prep.record import Record, message_text
from data_prep.steps.base import Step
from data_prep.steps.clean import clean_text
from data_prep.steps.dedup import Deduplicator
from data_prep.steps.filters import ChatThresholds, chat_checks
from data_prep.steps.redact import redact, redact_arguments


class CleanStep(Step):
    name = "clean"

    def __init__(self, fix_unicode: bool = True) -> None:
        super().__init__()
        self.fix_unicode = fix_unicode

    def process(self, rec: Record) -> str | None:
        for m in rec.messages:
            # Tool-call arguments are left as written: they are values a function receives.
            if isinstance(m.get("content"), str):
                m["content"] = clean_text(m["content"], self.fix_unicode)
        if rec.context and not rec.context_ready:
            rec.context = clean_text(rec.context, self.fix_unicode)
        return None


class RedactStep(Step):
    name = "redact"

    def __init__(self, types: list[str], counts: Counter) -> None:
        super().__init__()
        self.types, self.counts = tuple(types), counts

    def process(self, rec: Record) -> str | None:
        for m in rec.messages:
            if isinstance(m.get("content"), str):
                m["content"] = redact(m["content"], self.types, self.counts)
            for call in m.get("tool_calls") or []:
                fn = call["function"]
                fn["arguments"] = redact_arguments(fn["arguments"], self.types, self.counts)
        if rec.context and not rec.context_ready:
            rec.context = redact(rec.context, self.types, self.counts)
        return None


class AssembleStep(Step):
    """Fix the dedup text (tool calls included), then prepend the context to the first user turn:
    CONTEXT + blank line + QUESTION."""

    name = "assemble"

    def process(self, rec: Record) -> str | None:
        rec.own_text = "\n".join(message_text(m) for m in rec.messages if m["role"] != "system")
        if rec.context:
            for m in rec.messages:
                if m["role"] == "user":
                    m["content"] = f"{rec.context}\n\n{m['content']}" if m["content"] else rec.context
                    break
            rec.context = ""
        return None


class ChatFilterStep(Step):
    name = "chat_filter"

    def __init__(self, thresholds: ChatThresholds) -> None:
        super().__init__()
        self.t = thresholds

    def process(self, rec: Record) -> str | None:
        return chat_checks(rec.messages, self.t)


class DedupStep(Step):
    name = "dedup"

    def __init__(self, dedup: Deduplicator, on_near_match: Callable[[str, str], None] | None = None) -> None:
        super().__init__()
        self.dedup = dedup
        self.on_near_match = on_near_match
        self.kept_near = 0

    @property
    def clusters(self) -> dict[str, int]:
        """Representative -> records dropped as its duplicates or grouped with it."""
        return self.dedup.clusters

    def process(self, rec: Record) -> str | None:
        reason = self.dedup.check(rec.id, rec.dedup_text(), rec.context_key, rec.group)
        if reason is None and self.dedup.last_matches:
            # kept near-duplicate (near_action=group): its group joins the group of every kept
            # record it resembles, not only the closest, so that no similar pair is split apart
            self.kept_near += 1
            if self.on_near_match is not None:
                for _, group in self.dedup.last_matches:
                    self.on_near_match(rec.group, group)
        return reason
