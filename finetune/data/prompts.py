"""Prompts in the data cache: the shard builder for `method: grpo` (data kind `prompts`), beside the
SFT one in finetune.data.cache and the preference one in finetune.data.preference.

    prompt JSONL --(kitcore.prompts: read, check; chat_template.render_prompt)--> shard-*.arrow
      prompt_ids, prompt, columns, length, line

`prompt_ids` is the prompt rendered by the run's chat template up to its generation prompt, with
the record's tools, tokenized once here: the trainer generates from these ids and never renders a
prompt again. `prompt` is the prompt's messages and `columns` the record's other keys (the reference
`answer`, `tests`, a JSON `schema`, `tools`, ...), both as JSON text: the reward functions get them,
decoded, for the prompts of their batch only. `length` is the prompt's tokens plus the completion
room (`spec.completion_room`, the method's longest completion): the longest row training can see.
A prompt that leaves less than that room under `max_length` is dropped ("prompt_too_long", counted
in the run's stats; it is not cut: a prompt cut on the left loses its instructions, on the right its
question), whatever `data.too_long` says.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finetune.data.chat_template import ChatFormatError, render_prompt
from finetune.data.shards import ENCODE_BATCH, CacheSpec, ShardResult, iter_lines, write_columns

__all__ = ["build_prompt_shard", "decode_row"]


def _schema():
    import pyarrow as pa

    return pa.schema([("prompt_ids", pa.list_(pa.int32())), ("prompt", pa.large_string()),
                      ("columns", pa.large_string()), ("length", pa.int32()), ("line", pa.int64())])


def decode_row(row: dict[str, Any]) -> dict[str, Any]:
    """A cached row as TRL's GRPOTrainer reads one: `prompt` (messages), `prompt_ids`, and the record's
    columns (`tools` among them when it declares any) by name."""
    out = json.loads(row["columns"])
    out["prompt"] = json.loads(row["prompt"])
    out["prompt_ids"] = list(row["prompt_ids"])
    return out


def build_prompt_shard(tokenizer: Any, spec: CacheSpec, shard: tuple[int, int, int], out_file: str) -> ShardResult:
    """Read one byte range of a prompt file, check and encode its lines, write one Arrow stream."""
    import pyarrow as pa

    from kitcore.prompts import PromptError, normalize_prompt

    path = Path(spec.path)
    res = ShardResult(file=out_file, source=spec.path)
    schema = _schema()
    cols: dict[str, list] = {name: [] for name in schema.names}
    room = spec.completion_room

    with open(out_file, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for lineno, line in iter_lines(path, shard):
            if len(cols["length"]) >= ENCODE_BATCH:
                write_columns(writer, schema, cols, res)
            res.examples += 1
            problem = None
            try:
                rec = normalize_prompt(json.loads(line))
            except json.JSONDecodeError as exc:
                problem = f"malformed JSON ({exc.msg} at column {exc.colno})"
            except PromptError as exc:
                problem = str(exc)
            if problem:
                res.bad_line(f"{path}:{lineno}: {problem}")
                continue
            try:
                text = render_prompt(tokenizer, rec.messages, rec.tools)
            except ChatFormatError as exc:
                res.format_error = f"{path}:{lineno}: {exc}"
                break
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) + room > spec.max_length:
                res.dropped["prompt_too_long"] += 1
                continue
            columns = dict(rec.columns)
            if rec.tools:
                columns["tools"] = rec.tools
            cols["prompt_ids"].append(ids)
            cols["prompt"].append(json.dumps(rec.messages, ensure_ascii=False))
            cols["columns"].append(json.dumps(columns, ensure_ascii=False))
            cols["length"].append(len(ids) + room)
            cols["line"].append(lineno)
            res.kept += 1
            res.tokens += len(ids)
            res.trained_tokens += room  # at most: the completions are generated while training
            res.max_tokens = max(res.max_tokens, len(ids) + room)
        write_columns(writer, schema, cols, res)
    return res
