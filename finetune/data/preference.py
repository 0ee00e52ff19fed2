"""Preference data in the data cache: the shard builder for `method: dpo` (pairs) and `method: kto`
(unpaired examples), beside the SFT one in finetune.data.cache.

    preference JSONL --(kitcore.preference: read, check; chat_template.encode_completion)--> shard-*.arrow
      pairs:    prompt_ids, chosen_ids, rejected_ids, length, line      (TRL's DataCollatorForPreference)
      unpaired: prompt_ids, completion_ids, label, length, line         (TRL's KTO collator)

The prompt is tokenized once per pair: when the chosen and rejected renders tokenize the prompt
differently (a token merging across the boundary), the shared token prefix is the prompt and the
rest goes to each completion, as TRL does. `length` is prompt + the longer completion (what the
length-grouped sampler batches by). `data.too_long`: `truncate` cuts completions to fit
`max_length` (a pair whose prompt alone does not fit is dropped: nothing of its answers would be
scored), `drop` drops every pair that does not fit; drops are counted by reason in the run's stats.
For `method: kto`, a pair gives two unpaired examples (chosen desirable, rejected undesirable).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finetune.data.chat_template import ChatFormatError, encode_completion
from finetune.data.kinds import PAIRS, UNPAIRED, kind
from finetune.data.shards import ENCODE_BATCH, CacheSpec, ShardResult, iter_lines, write_columns

__all__ = ["build_preference_shard", "PAIR_COLUMNS", "UNPAIRED_COLUMNS"]

PAIR_COLUMNS = PAIRS.columns
UNPAIRED_COLUMNS = tuple(c for c in UNPAIRED.columns if c.endswith("_ids"))  # and the label


def _schema(unpaired: bool):
    import pyarrow as pa

    ids = [(c, pa.list_(pa.int32())) for c in (UNPAIRED_COLUMNS if unpaired else PAIR_COLUMNS)]
    extra = [("label", pa.bool_())] if unpaired else []
    return pa.schema([*ids, *extra, ("length", pa.int32()), ("line", pa.int64())])


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _fit(prompt: list[int], completions: list[list[int]], max_length: int, too_long: str):
    """(completions cut to fit, truncated?) or a drop reason."""
    if len(prompt) + max(len(c) for c in completions) <= max_length:
        return completions, False
    if too_long == "drop":
        return "too_long"
    room = max_length - len(prompt)
    if room <= 0:
        return "prompt_too_long"
    return [c[:room] for c in completions], True


def build_preference_shard(tokenizer: Any, spec: CacheSpec, shard: tuple[int, int, int], out_file: str) -> ShardResult:
    """Read one byte range of a preference file, check and encode its lines, write one Arrow stream."""
    import pyarrow as pa

    from kitcore.preference import PreferenceError, normalize_preference

    path = Path(spec.path)
    unpaired = kind(spec.kind).unpaired
    res = ShardResult(file=out_file, source=spec.path)
    schema = _schema(unpaired)
    cols: dict[str, list] = {name: [] for name in schema.names}

    def add(prompt: list[int], completions: list[list[int]], lineno: int, label: bool | None = None) -> None:
        fitted = _fit(prompt, completions, spec.max_length, spec.too_long)
        if isinstance(fitted, str):
            res.dropped[fitted] += 1
            return
        completions, truncated = fitted
        if not all(completions):
            res.untrained.append(f"{path}:{lineno}")
            return
        names = PAIR_COLUMNS[1:] if not unpaired else UNPAIRED_COLUMNS[1:]
        cols["prompt_ids"].append(prompt)
        for name, c in zip(names, completions):
            cols[name].append(c)
        if unpaired:
            cols["label"].append(label)
        n = len(prompt) + max(len(c) for c in completions)
        cols["length"].append(n)
        cols["line"].append(lineno)
        res.kept += 1
        res.truncated += truncated
        res.tokens += sum(len(prompt) + len(c) for c in completions)
        res.trained_tokens += sum(len(c) for c in completions)
        res.max_tokens = max(res.max_tokens, n)

    with open(out_file, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for lineno, line in iter_lines(path, shard):
            if len(cols["length"]) >= ENCODE_BATCH:
                write_columns(writer, schema, cols, res)
            res.examples += 1
            try:
                rec = normalize_preference(json.loads(line), unpaired=unpaired)
            except json.JSONDecodeError as exc:
                problem = f"malformed JSON ({exc.msg} at column {exc.colno})"
            except PreferenceError as exc:
                problem = str(exc)
            else:
                problem = None
            if problem:
                res.bad_line(f"{path}:{lineno}: {problem}")
                continue
            try:
                first = encode_completion(tokenizer, rec.prompt, rec.chosen, rec.tools)
                if rec.paired:
                    second = encode_completion(tokenizer, rec.prompt, rec.rejected, rec.tools)
            except ChatFormatError as exc:
                res.format_error = f"{path}:{lineno}: {exc}"
                break
            if not rec.paired:
                add(first.prompt_ids, [first.completion_ids], lineno, rec.label)
                continue
            c_full = first.prompt_ids + first.completion_ids
            r_full = second.prompt_ids + second.completion_ids
            if first.prompt_ids == second.prompt_ids:  # the usual case, at C speed: the prefix is the prompt
                p = len(first.prompt_ids)
            else:
                p = min(_common_prefix(c_full, r_full), len(first.prompt_ids), len(second.prompt_ids))
            prompt, chosen, rejected = c_full[:p], c_full[p:], r_full[p:]
            if unpaired:  # a pair read as two KTO examples
                add(prompt, [chosen], lineno, True)
                add(prompt, [rejected], lineno, False)
            else:
                add(prompt, [chosen, rejected], lineno)
        write_columns(writer, schema, cols, res)
    return res
