"""`finetune eval` on preference data: does the model prefer the chosen completion?

Per pair, the log-probability of the chosen and of the rejected completion given the prompt, summed
over the completion's tokens (the same tokens DPO scores: finetune.data.chat_template.encode_completion).
Reported per model, base and tuned side by side:
    preference_accuracy            fraction of pairs with log p(chosen) > log p(rejected)
    preference_accuracy_per_token  the same on log-probabilities per completion token (length-normalized)
    logp_margin                    mean of log p(chosen) - log p(rejected)
    logp_margin_per_token          the same per token
and, for the tuned model against the base as reference (DPO's implicit reward, divided by beta):
    reward_margin                  mean of [log p_t(c) - log p_b(c)] - [log p_t(r) - log p_b(r)]
    reward_accuracy                fraction of pairs where that margin is > 0
Unpaired (KTO) records, `{"prompt", "completion", "label"}`, have no second completion to compare
with; per model:
    unpaired_logp_margin_per_token mean log p per token of the desirable completions minus that of
                                   the undesirable ones (n_desirable, n_undesirable)
and for the tuned model against the base (KTO's implicit reward r = log p_t - log p_b, over beta):
    kto_reward_accuracy            fraction of records with r > 0 if desirable, r < 0 if not
    kto_reward_margin              mean r of the desirable minus mean r of the undesirable
A file may hold both kinds. The LM head runs only at completion positions, a chunk at a time
(finetune.models.losses.chunked_nll).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["is_preference_file", "preference_kinds", "read_preference_records", "score_preferences",
           "reward_scores"]


def is_preference_file(path: str | Path) -> bool:
    """Whether the first record of a JSONL file is a preference record (not chat JSONL)."""
    from kitcore.preference import is_preference_record

    with Path(path).open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.strip():
                try:
                    return is_preference_record(json.loads(line))
                except json.JSONDecodeError:
                    return False
    return False


def preference_kinds(path: str | Path) -> set[str]:
    """Which kinds of valid record a preference file holds: {"paired", "unpaired"} or a part."""
    records, _ = read_preference_records(path)
    return {"paired" if r["preference"].paired else "unpaired" for r in records}


def read_preference_records(path: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Lenient reader, like evaluate.read_eval_records: bad lines counted with their numbers and reasons.
    Pairs and unpaired (KTO) records are both read (Preference.paired tells them apart)."""
    from kitcore.preference import PreferenceError, normalize_preference

    path = Path(path)
    from kitcore.integrity import require_listed_intact

    require_listed_intact(path)  # against data-prep's checksums.json, when it wrote this file
    records, skipped = [], []
    with path.open(encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                pref = normalize_preference(json.loads(line), unpaired=True)
            except json.JSONDecodeError:
                skipped.append({"line": lineno, "reason": "malformed JSON"})
                continue
            except PreferenceError as exc:
                skipped.append({"line": lineno, "reason": str(exc)})
                continue
            records.append({"preference": pref, "line": lineno})
    reasons: dict[str, int] = {}
    for s in skipped:
        reasons[s["reason"]] = reasons.get(s["reason"], 0) + 1
    return records, {"file": str(path), "examples": len(records), "skipped": reasons, "skipped_lines": skipped[:50],
                     "kind": "preference"}


def _completion_logps(model, batch: list[tuple[list[int], list[int]]]) -> list[float]:
    """Summed log-probability of each completion given its prompt (one padded forward pass)."""
    import torch

    from finetune.data.chat_template import IGNORE_INDEX
    from finetune.models.losses import chunked_nll, lm_parts

    device = next(model.parameters()).device
    width = max(len(p) + len(c) for p, c in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for i, (p, c) in enumerate(batch):
        seq = p + c
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
        labels[i, len(p):len(seq)] = torch.tensor(c)
    ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
    target = labels[:, 1:]
    with torch.no_grad():
        parts = lm_parts(model)
        if parts is None:
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            logp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            return [float(v) for v in (logp * (target != IGNORE_INDEX)).sum(-1).cpu()]
        decoder, head, post = parts
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False)[0][:, :-1]
        vocab = base.config.get_text_config().vocab_size
        out = []
        for i in range(len(batch)):
            scored = target[i] != IGNORE_INDEX
            nll, _ = chunked_nll(hidden[i][scored], head, target[i][scored], vocab=vocab, post=post)
            out.append(-float(nll))
        return out


def score_preferences(model, tokenizer, records: list[dict[str, Any]], *, batch_size: int = 8,
                      max_length: int | None = None) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """(metrics, one row per pair with its log-probabilities) for one model; all ranks score a shard
    and the rows are gathered, so every rank returns the whole set."""
    from finetune.data.chat_template import encode_completion
    from kitcore.runtime import process_group

    dist = process_group()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)
    was_training = model.training
    model.eval()
    rows = []
    mine = records[rank::world]
    for start in range(0, len(mine), batch_size):
        chunk = mine[start:start + batch_size]
        seqs, keep = [], []
        for rec in chunk:
            pref = rec["preference"]
            encoded = [encode_completion(tokenizer, pref.prompt, side, pref.tools)
                       for side in ((pref.chosen, pref.rejected) if pref.paired else (pref.chosen,))]
            if max_length is not None:  # score what fits, prompt first, as training does
                for e in encoded:
                    e.completion_ids = e.completion_ids[:max(0, max_length - len(e.prompt_ids))]
            if not all(e.completion_ids for e in encoded):
                continue
            keep.append((rec, len(seqs), len(encoded)))
            seqs += [(e.prompt_ids, e.completion_ids) for e in encoded]
        if not seqs:
            continue
        logps = _completion_logps(model, seqs)
        for rec, at, n in keep:
            if n == 2:
                (_, cc), (_, rc) = seqs[at], seqs[at + 1]
                rows.append({"line": rec["line"], "logp_chosen": logps[at], "logp_rejected": logps[at + 1],
                             "chosen_tokens": len(cc), "rejected_tokens": len(rc)})
            else:
                rows.append({"line": rec["line"], "label": rec["preference"].label, "logp_completion": logps[at],
                             "completion_tokens": len(seqs[at][1])})
    if was_training:
        model.train()
    if dist:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, rows)
        rows = sorted((r for part in gathered for r in part), key=lambda r: r["line"])
    return _metrics(rows), rows


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _metrics(all_rows: list[dict[str, Any]]) -> dict[str, float]:
    rows = [r for r in all_rows if "logp_chosen" in r]
    single = [r for r in all_rows if "logp_completion" in r]
    n = len(rows)
    if not n and not single:
        return {"preference_accuracy": math.nan, "n": 0}
    out: dict[str, float] = {}
    if n:
        margin = [r["logp_chosen"] - r["logp_rejected"] for r in rows]
        per_tok = [r["logp_chosen"] / r["chosen_tokens"] - r["logp_rejected"] / r["rejected_tokens"] for r in rows]
        out.update(preference_accuracy=sum(m > 0 for m in margin) / n,
                   preference_accuracy_per_token=sum(m > 0 for m in per_tok) / n,
                   logp_margin=sum(margin) / n, logp_margin_per_token=sum(per_tok) / n)
    out["n"] = n
    if single:
        per_tok = {label: [r["logp_completion"] / r["completion_tokens"] for r in single if r["label"] is label]
                   for label in (True, False)}
        out.update(unpaired_logp_margin_per_token=_mean(per_tok[True]) - _mean(per_tok[False]),
                   n_desirable=len(per_tok[True]), n_undesirable=len(per_tok[False]))
    return out


def reward_scores(base_rows: list[dict[str, Any]], tuned_rows: list[dict[str, Any]]) -> dict[str, float]:
    """DPO's implicit reward margin of the tuned model with the base as reference (divided by beta);
    for unpaired records, KTO's implicit reward (module docstring)."""
    base = {r["line"]: r for r in base_rows}
    margins = [(t["logp_chosen"] - base[t["line"]]["logp_chosen"])
               - (t["logp_rejected"] - base[t["line"]]["logp_rejected"])
               for t in tuned_rows if t["line"] in base and "logp_chosen" in t]
    # unpaired: KTO's implicit reward of the one completion, which the label says should rise or fall
    single = [(t["label"], t["logp_completion"] - base[t["line"]]["logp_completion"])
              for t in tuned_rows if t["line"] in base and "logp_completion" in t]
    out = {}
    if margins:
        out.update(reward_margin=sum(margins) / len(margins),
                   reward_accuracy=sum(m > 0 for m in margins) / len(margins))
    if single:
        out.update(kto_reward_accuracy=sum((r > 0) if label else (r < 0) for label, r in single) / len(single),
                   kto_reward_margin=_mean([r for label, r in single if label])
                   - _mean([r for label, r in single if not label]))
    return out
