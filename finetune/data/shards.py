"""What one data-cache build worker is given and returns, shared by the builders of every kind of
data (finetune.data.cache for chat JSONL, finetune.data.preference for pairs and unpaired examples,
finetune.data.prompts for prompts)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from finetune.data.files import DataStats

__all__ = ["ENCODE_BATCH", "MAX_SHOWN_PROBLEMS", "CacheSpec", "ShardResult", "iter_lines", "write_columns"]

ENCODE_BATCH = 256  # conversations per tokenizer call: fast-tokenizer batching without much memory
MAX_SHOWN_PROBLEMS = 20


@dataclass(frozen=True)
class CacheSpec:
    """What decides the tokens of one dataset (a file, or shards: see finetune.data.files.data_files)."""

    path: str
    max_length: int
    loss_on: str = "assistant"
    too_long: str = "truncate"
    packing: bool = False
    key_mode: str = "content"  # content | stat
    kind: str = "chat"  # chat | pairs | unpaired | prompts: finetune.data.kinds
    # prompts: the tokens each prompt leaves for its generated completion (a longer prompt is dropped)
    completion_room: int = 0


@dataclass
class ShardResult(DataStats):
    """What one worker found in its byte range of the file (merged in file order): the counts
    training prints, and what is needed to raise training's errors for the whole file."""

    bad_lines: int = 0
    problems: list[str] = field(default_factory=list)  # the first MAX_SHOWN_PROBLEMS bad lines
    untrained: list[str] = field(default_factory=list)  # as "file:line"
    format_error: str | None = None  # the first example the chat template cannot render
    rows: int = 0
    file: str | None = None
    source: str = ""  # the data file (or shard) this byte range is from

    def bad_line(self, problem: str) -> None:
        """Count a line training refuses; keep its problem ("file:line: why") among the first shown."""
        self.bad_lines += 1
        if len(self.problems) < MAX_SHOWN_PROBLEMS:
            self.problems.append(problem)


def write_columns(writer, schema, cols: dict[str, list], res: ShardResult) -> None:
    """Write the buffered columns (one list per schema field) as one record batch, count its rows in
    `res`, and empty the buffers. Nothing buffered: nothing written."""
    import pyarrow as pa

    n = len(cols[schema.names[0]])
    if n:
        writer.write_batch(pa.record_batch([pa.array(cols[name], schema.field(name).type) for name in schema.names],
                                           schema=schema))
        res.rows += n
        for v in cols.values():
            v.clear()


def iter_lines(path: Path, shard: tuple[int, int, int]):
    """(line number, text) of the non-blank lines of one byte range of a JSONL file."""
    start, end, first_line = shard
    with path.open("rb") as fh:
        fh.seek(start)
        lineno = first_line - 1
        while fh.tell() < end:
            raw = fh.readline()
            lineno += 1
            line = raw.decode("utf-8", errors="strict") if raw else ""
            if line.strip():
                yield lineno, line
