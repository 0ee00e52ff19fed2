"""`finetune eval` on preference data: does the model prefer the chosen completion?

Per pair, the log-probability of the chosen and of the rejected completion given the prompt, summed
over the completion's tokens (the same tokens DPO scores: finetune.chat_template.encode_completion).
Reported per model, base and tuned side by side:
    preference_accuracy            fraction of pairs with log p(chosen) > log p(rejected)
    preference_accuracy_per_token  the same on log-probabilities per completion token (length-normalized)
    logp_margin                    mean of log p(chosen) - log p(rejected)
    logp_margin_per_token          the same per token
and, for the tuned model against the base as reference (DPO's implicit reward, divided by beta):
    reward_margin                  mean of [log p_t(c) - log p_b(c)] - [log p_t(r) - log p_b(r)]
    reward_accuracy                fraction of pairs where that margin is > 0
The LM head runs only at completion positions, a chunk at a time (finetune.losses.chunked_nll).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["is_preference_file", "read_preference_records", "score_preferences", "reward_scores"]


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


def read_preference_records(path: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Lenient reader, like evaluate.read_eval_records: bad lines counted with their numbers and reasons."""
    from kitcore.preference import PreferenceError, normalize_preference

    path = Path(path)
    records, skipped = [], []
    with path.open(encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                pref = normalize_preference(json.loads(line))
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

    from finetune.chat_template import IGNORE_INDEX
    from finetune.losses import chunked_nll, lm_parts

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
    from finetune.chat_template import encode_completion
    from finetune.evaluate import _dist, _shard

    dist = _dist()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)
    was_training = model.training
    model.eval()
    rows = []
    mine = _shard(records, rank, world)
    for start in range(0, len(mine), batch_size):
        chunk = mine[start:start + batch_size]
        seqs, keep = [], []
        for rec in chunk:
            pref = rec["preference"]
            c = encode_completion(tokenizer, pref.prompt, pref.chosen)
            r = encode_completion(tokenizer, pref.prompt, pref.rejected)
            if max_length is not None:  # score what fits, prompt first, as training does
                c.completion_ids = c.completion_ids[:max(0, max_length - len(c.prompt_ids))]
                r.completion_ids = r.completion_ids[:max(0, max_length - len(r.prompt_ids))]
            if not c.completion_ids or not r.completion_ids:
                continue
            seqs += [(c.prompt_ids, c.completion_ids), (r.prompt_ids, r.completion_ids)]
            keep.append(rec)
        if not seqs:
            continue
        logps = _completion_logps(model, seqs)
        for j, rec in enumerate(keep):
            (_, cc), (_, rc) = seqs[2 * j], seqs[2 * j + 1]
            rows.append({"line": rec["line"], "logp_chosen": logps[2 * j], "logp_rejected": logps[2 * j + 1],
                         "chosen_tokens": len(cc), "rejected_tokens": len(rc)})
    if was_training:
        model.train()
    if dist:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, rows)
        rows = sorted((r for part in gathered for r in part), key=lambda r: r["line"])
    return _metrics(rows), rows


def _metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    n = len(rows)
    if not n:
        return {"preference_accuracy": math.nan, "n": 0}
    margin = [r["logp_chosen"] - r["logp_rejected"] for r in rows]
    per_tok = [r["logp_chosen"] / r["chosen_tokens"] - r["logp_rejected"] / r["rejected_tokens"] for r in rows]
    return {
        "preference_accuracy": sum(m > 0 for m in margin) / n,
        "preference_accuracy_per_token": sum(m > 0 for m in per_tok) / n,
        "logp_margin": sum(margin) / n,
        "logp_margin_per_token": sum(per_tok) / n,
        "n": n,
    }


def reward_scores(base_rows: list[dict[str, Any]], tuned_rows: list[dict[str, Any]]) -> dict[str, float]:
    """DPO's implicit reward margin of the tuned model with the base as reference (divided by beta)."""
    base = {r["line"]: r for r in base_rows}
    margins = [(t["logp_chosen"] - base[t["line"]]["logp_chosen"])
               - (t["logp_rejected"] - base[t["line"]]["logp_rejected"])
               for t in tuned_rows if t["line"] in base]
    if not margins:
        return {}
    return {"reward_margin": sum(margins) / len(margins),
            "reward_accuracy": sum(m > 0 for m in margins) / len(margins)}
