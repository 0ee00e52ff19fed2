#!/usr/bin/env python
"""Preference pairs from the quickstart's chat data, for the README's SFT -> DPO walkthrough.

    python scripts/make_quickstart_pairs.py quickstart_output/data quickstart_output/pairs

For every example of train/val/test.jsonl whose answer is a price: the prompt is the conversation up
to the last assistant turn, chosen is the reference answer, rejected is the same answer with its
price replaced by another price quoted in the prompt (plausible, wrong). Examples with no other
price in the prompt are left out and counted.
"""
from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

PRICE = re.compile(r"\$\d+(?:\.\d\d)?")


def pairs(path: Path, rng: random.Random) -> tuple[list[dict], int]:
    out, skipped = [], 0
    for line in path.read_text().splitlines():
        msgs = json.loads(line)["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        answer = msgs[last]["content"]
        right = PRICE.findall(answer)
        others = sorted({p for m in msgs[:last] for p in PRICE.findall(m["content"])} - set(right))
        if not right or not others:
            skipped += 1
            continue
        wrong = answer.replace(right[0], rng.choice(others))
        out.append({"prompt": msgs[:last], "chosen": [msgs[last]],
                    "rejected": [{"role": "assistant", "content": wrong}]})
    return out, skipped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", help="directory with train/val/test.jsonl (data-prep build's output)")
    ap.add_argument("output", help="directory for the pairs")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        rows, skipped = pairs(Path(args.data) / f"{split}.jsonl", rng)
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{split}: {len(rows)} pairs ({skipped} examples without a second price left out) -> {out / split}.jsonl")


if __name__ == "__main__":
    main()
