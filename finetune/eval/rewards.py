"""`finetune eval` of held-out prompts by reward functions: what a `method: grpo` run trained for.

Each prompt record (kitcore.prompts: a chat ending on the user's turn, or with the reference
answer as its last assistant turn; TRL's {"prompt", "answer", ...}) gets one greedy reply, the same
path as `finetune chat` (finetune.inference.load.generate_replies), scored by the run's reward
functions (finetune.methods.rewards, the config's `grpo.rewards`, recorded in the adapter's
finetune.json). The report's `rewards` section holds each function's mean (None scores, "not
applicable", left out), `reward`: the weighted sum's mean (TRL's total: a None counts 0), the
completions a function failed on (`errors`) and `n`; every reply is in predictions.jsonl with its
scores. Under `accelerate launch` each rank replies to a shard and rank 0 gathers them in order.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from finetune.console import is_main_process, rank0_print
from finetune.methods.rewards import RECORD_KEY  # finetune.json's record of the reward functions
from kitcore.runtime import process_group

__all__ = ["RECORD_KEY", "read_prompt_records", "resolve_rewards", "reward_scores", "score_reward_model"]


def resolve_rewards(rewards, adapter, tuned_model) -> dict[str, Any] | None:
    """{"rewards": [spec dicts], "max_completion_length": n} to score with: as given (a list of
    specs), or ("auto") what a grpo run recorded in its finetune.json; None: no reward scoring."""
    if rewards in (None, "none"):
        return None
    if rewards != "auto":
        return {"rewards": list(rewards), "max_completion_length": None}
    for d in (adapter, tuned_model):
        meta = Path(d) / "finetune.json" if d is not None else None
        if meta is not None and meta.is_file():
            return json.loads(meta.read_text()).get(RECORD_KEY)
    return None


def read_prompt_records(path: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Lenient reader: a bad line is counted with its line number and reason, never a crash."""
    from kitcore.integrity import require_listed_intact
    from kitcore.prompts import PromptError, normalize_prompt

    path = Path(path)
    require_listed_intact(path)
    records, skipped = [], []
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = normalize_prompt(json.loads(line))
        except json.JSONDecodeError as exc:
            skipped.append({"line": lineno, "reason": f"malformed JSON ({exc.msg})"})
            continue
        except PromptError as exc:
            skipped.append({"line": lineno, "reason": str(exc)})
            continue
        records.append({"line": lineno, "messages": rec.messages, "tools": rec.tools, "columns": rec.columns})
    if skipped:
        rank0_print(f"{path}: {len(skipped)} line(s) skipped (first: line {skipped[0]['line']}: "
                    f"{skipped[0]['reason']})")
    return records, {"path": str(path), "records": len(records), "skipped": skipped}


def reward_scores(rewards, weights: list[float], tokenizer, records: list[dict], replies: list[str]):
    """(aggregate, per-record scores) of `replies` to `records` under the Reward functions."""
    n = len(records)
    completions = [[{"role": "assistant", "content": r}] for r in replies]
    ids = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in replies]
    keys = sorted({k for r in records for k in r["columns"]} | ({"tools"} if any(r["tools"] for r in records) else set()))
    columns = {k: [(r["tools"] if k == "tools" and k not in r["columns"] else r["columns"].get(k)) for r in records]
               for k in keys}
    per_fn = {}
    for reward in rewards:
        before = sum(reward.total_errors.values())
        scores = reward(prompts=[r["messages"] for r in records], completions=completions, completion_ids=ids,
                        **columns)
        per_fn[reward.__name__] = (scores, sum(reward.total_errors.values()) - before)
    aggregate: dict[str, Any] = {}
    for name, (scores, _) in per_fn.items():
        valid = [s for s in scores if s is not None]
        aggregate[name] = sum(valid) / len(valid) if valid else float("nan")
    totals = [sum(w * (per_fn[r.__name__][0][i] or 0.0) for r, w in zip(rewards, weights)) for i in range(n)]
    aggregate["reward"] = sum(totals) / n if n else float("nan")
    aggregate["errors"] = sum(e for _, e in per_fn.values())
    aggregate["n"] = n
    rows = [{name: scores[i] for name, (scores, _) in per_fn.items()} | {"reward": totals[i]} for i in range(n)]
    return aggregate, rows


def score_reward_model(model, tokenizer, records, *, label: str, reward_spec: dict, max_new_tokens: int,
                       batch_size: int, **_) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from finetune.inference.load import generate_replies
    from finetune.methods.grpo import RewardSpec
    from finetune.methods.rewards import build_rewards

    t0 = time.perf_counter()
    specs = [RewardSpec(**s) for s in reward_spec["rewards"]]
    room = reward_spec.get("max_completion_length") or max_new_tokens
    rewards = build_rewards(specs, room)
    dist = process_group()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)
    mine = list(enumerate(records))[rank::world]
    replies = generate_replies(model, tokenizer, [r["messages"] for _, r in mine], max_new_tokens=max_new_tokens,
                               batch_size=batch_size, progress=is_main_process(), tools=[r["tools"] for _, r in mine])
    local = [(i, reply) for (i, _), reply in zip(mine, replies)]
    if dist:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, local)
        local = sorted((x for part in gathered for x in part), key=lambda x: x[0])
    replies = [reply for _, reply in local]
    aggregate, scores = reward_scores(rewards, [s.weight for s in specs], tokenizer, records, replies)
    rows = [{"line": r["line"], "prompt": r["messages"], "reference": r["columns"].get("answer"), "prediction": p,
             "scores": s} for r, p, s in zip(records, replies, scores)]
    shown = ", ".join(f"{k} {v:.3f}" for k, v in aggregate.items() if k not in ("n", "errors", "reward")
                      and isinstance(v, float) and math.isfinite(v))
    rank0_print(f"  {label}: mean reward {aggregate['reward']:.3f} ({shown}; {aggregate['errors']} reward errors) "
                f"({time.perf_counter() - t0:.1f} s)")
    return {"rewards": aggregate}, rows
