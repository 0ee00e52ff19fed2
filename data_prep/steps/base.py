"""Step protocol: a generator over records that drops with a reason (datatrove's PipelineStep)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator

from data_prep.record import Record, reason_kind

OnReject = Callable[[Record, str, str], None]


class Step:
    """Subclasses implement `process(record) -> None | reason`; they may edit the record in place."""

    name = "step"

    def __init__(self) -> None:
        self.n_in = 0
        self.n_out = 0
        self.dropped: Counter[str] = Counter()

    def process(self, rec: Record) -> str | None:
        raise NotImplementedError

    def apply(self, rec: Record) -> str | None:
        """`process` one record and count it: None (kept) or the reason it is dropped."""
        self.n_in += 1
        reason = self.process(rec)
        if reason is None:
            self.n_out += 1
        else:
            self.dropped[reason_kind(reason)] += 1
        return reason

    def run(self, records: Iterable[Record], on_reject: OnReject) -> Iterator[Record]:
        for rec in records:
            reason = self.apply(rec)
            if reason is None:
                yield rec
            else:
                on_reject(rec, self.name, reason)

    def stats(self) -> dict:
        return {"in": self.n_in, "out": self.n_out, "dropped": dict(sorted(self.dropped.items()))}


def add_stats(total: dict, part: dict) -> dict:
    """Sum of two `Step.stats()` (a step that ran on several workers, or on several files)."""
    dropped = Counter(total.get("dropped", {}))
    dropped.update(part["dropped"])
    return {
        "in": total.get("in", 0) + part["in"],
        "out": total.get("out", 0) + part["out"],
        "dropped": dict(sorted(dropped.items())),
    }
