"""Preference pairs from the quickstart's chat splits, for the SFT -> DPO walkthrough:

    python scripts/quickstart_pairs.py quickstart_output/data quickstart_output/pairs

For every chat of train/val/test.jsonl: the prompt is the chat up to its last assistant turn, chosen
is that turn (the price read off the page), rejected a plausible wrong price of the kind a small
model gets wrong (the quickstart's SFT adapter's mistakes are mostly these): one digit copied over
another ("$234" -> "$244", "$50.99" -> "$50.59"), a digit repeated ("$331" -> "$3311"), the digits
cut short ("$331" -> "$33"), two digits swapped ("$331" -> "$313"), or the cents dropped
("$152.50" -> "$152"). A chat whose answer is not a price, or has no such variant,
goes to OUT_DIR/skipped.jsonl with its file, line and reason. Deterministic (seed 0).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

PRICE = re.compile(r"^\$(\d+)(\.\d\d)?$")


def wrong_prices(answer: str) -> list[str]:
    """Plausible wrong variants of a price answer ("$331" -> ["$33", "$313", ...]); [] if not a price."""
    m = PRICE.match(answer.strip())
    if not m:
        return []
    digits, cents = m.group(1), m.group(2) or ""
    number = digits + cents
    out = [f"${digits}{digits[-1]}{cents}"]  # a digit repeated
    for i, d in enumerate(number):  # one digit copied over another ("$234" -> "$244", "$50.99" -> "$50.59")
        if d == ".":
            continue
        for other in set(number) - {d, "."}:
            wrong = number[:i] + other + number[i + 1:]
            if not wrong.startswith("0"):
                out.append(f"${wrong}")
    if len(digits) >= 2:
        out.append(f"${digits[:-1]}{cents}")  # cut short
        for i in range(len(digits) - 1):
            swapped = digits[:i] + digits[i + 1] + digits[i] + digits[i + 2:]
            if swapped != digits and not swapped.startswith("0"):
                out.append(f"${swapped}{cents}")
    if cents:
        out.append(f"${digits}")  # cents dropped
    right = answer.strip()
    return sorted({w for w in out if w != right})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data_dir", type=Path, help="the quickstart's data directory (train/val/test.jsonl)")
    ap.add_argument("output_dir", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    skipped = []
    for split in ("train", "val", "test"):
        src = args.data_dir / f"{split}.jsonl"
        if not src.is_file():
            print(f"error: {src} not found (run `finetune quickstart` first)", file=sys.stderr)
            return 2
        n = 0
        with open(src, encoding="utf-8") as fh, open(args.output_dir / f"{split}.jsonl", "w", encoding="utf-8") as out:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                msgs = json.loads(line)["messages"]
                k = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
                if k is None:
                    skipped.append({"file": str(src), "line": lineno, "reason": "no assistant turn"})
                    continue
                wrong = wrong_prices(msgs[k]["content"])
                if not wrong:
                    skipped.append({"file": str(src), "line": lineno,
                                    "reason": f"answer {msgs[k]['content']!r} has no plausible wrong price"})
                    continue
                pair = {"prompt": msgs[:k], "chosen": [msgs[k]],
                        "rejected": [{"role": "assistant", "content": rng.choice(wrong)}]}
                out.write(json.dumps(pair, ensure_ascii=False) + "\n")
                n += 1
        print(f"{split}: {n} pairs -> {args.output_dir / f'{split}.jsonl'}")
    with open(args.output_dir / "skipped.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(s) + "\n" for s in skipped)
    print(f"skipped: {len(skipped)} -> {args.output_dir / 'skipped.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
