"""`finetune preview`: the tokens of the first examples and which ones are trained.

It goes through the same `encode_chat` as training, so what it shows is what the trainer sees:
for a tool-calling example, the declared tools and tool results untrained, the assistant's calls
trained with its end-of-turn token, an assistant turn with `"weight": 0` untrained.
"""

from __future__ import annotations

import json
import sys

from finetune.config import TrainConfig
from finetune.data.chat_template import IGNORE_INDEX, encode_chat, encode_completion
from finetune.data.files import read_chat_jsonl
from finetune.models.loading import load_tokenizer

__all__ = ["preview", "preview_examples"]

_GREEN, _DIM, _RESET = "\033[42;30m", "\033[2m", "\033[0m"


def preview_examples(cfg: TrainConfig, n: int = 3, split: str = "train") -> list[dict]:
    """Per example: the list of {token, text, trained} and counts."""
    tok = load_tokenizer(cfg.model, chat_template=cfg.chat_template, trust_remote_code=cfg.trust_remote_code)
    path = cfg.data.train if split == "train" else cfg.data.eval
    if path is None:
        raise ValueError("data.eval is not set, so there is no eval split to preview")
    from finetune.data.kinds import kind

    data = kind(cfg.method_spec.data)
    if data.prompts:
        return _prompt_examples(tok, path, n)
    if not data.chat:
        return _preference_examples(tok, path, n, unpaired=data.unpaired)
    out = []
    for rec in read_chat_jsonl(path)[:n]:
        enc = encode_chat(tok, rec["messages"], max_length=cfg.max_length, loss_on=cfg.data.loss_on,
                          tools=rec.get("tools"))
        tokens = [
            {"token": tok.convert_ids_to_tokens(i), "text": tok.decode([i]), "trained": lab != IGNORE_INDEX}
            for i, lab in zip(enc.input_ids, enc.labels)
        ]
        out.append({"line": rec["line"], "file": rec.get("file", path), "n_tokens": len(tokens), "n_trained": enc.n_trained,
                    "truncated": enc.truncated, "tokens": tokens})
    return out


def _preference_examples(tok, path: str, n: int, unpaired: bool = False) -> list[dict]:
    """Per pair, two sequences: prompt + chosen and prompt + rejected (an unpaired KTO example: one,
    desirable or undesirable); the scored tokens are the completion's (chat_template.encode_completion,
    what the data cache stores). Reads n records only."""
    from finetune.data.files import data_files
    from kitcore.preference import normalize_preference

    out = []
    for file in data_files(path).files:  # a file, or the shards of a dataset in order
        with open(file, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if len(out) >= 2 * n:
                    return out
                if not line.strip():
                    continue
                pref = normalize_preference(json.loads(line), unpaired=unpaired)
                sides = ((("chosen", pref.chosen), ("rejected", pref.rejected)) if pref.paired
                         else ((("desirable" if pref.label else "undesirable"), pref.chosen),))
                for side, completion in sides:
                    enc = encode_completion(tok, pref.prompt, completion, pref.tools)
                    ids = enc.prompt_ids + enc.completion_ids
                    tokens = [{"token": tok.convert_ids_to_tokens(i), "text": tok.decode([i]),
                               "trained": k >= len(enc.prompt_ids)} for k, i in enumerate(ids)]
                    out.append({"line": lineno, "file": str(file), "side": side, "n_tokens": len(ids),
                                "n_trained": len(enc.completion_ids), "truncated": False, "tokens": tokens})
    return out


def _prompt_examples(tok, path: str, n: int) -> list[dict]:
    """Per prompt record: the prompt as the model sees it before it generates (the data cache's
    prompt_ids: chat_template.render_prompt with the record's tools), nothing trained (the
    completions are generated while training), and the columns the reward functions get."""
    from finetune.data.chat_template import render_prompt
    from finetune.data.files import data_files
    from kitcore.prompts import normalize_prompt

    out = []
    for file in data_files(path).files:
        with open(file, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if len(out) >= n:
                    return out
                if not line.strip():
                    continue
                rec = normalize_prompt(json.loads(line))
                ids = tok(render_prompt(tok, rec.messages, rec.tools), add_special_tokens=False)["input_ids"]
                tokens = [{"token": tok.convert_ids_to_tokens(i), "text": tok.decode([i]), "trained": False}
                          for i in ids]
                out.append({"line": lineno, "file": str(file), "side": "prompt", "n_tokens": len(ids), "n_trained": 0,
                            "truncated": False, "tokens": tokens, "columns": rec.columns})
    return out


def preview(cfg: TrainConfig, n: int = 3, as_json: bool = False, split: str = "train") -> None:
    examples = preview_examples(cfg, n, split)
    if as_json:
        json.dump(examples, sys.stdout, ensure_ascii=False, indent=1)
        sys.stdout.write("\n")
        return
    color = sys.stdout.isatty()
    for ex in examples:
        side = f" ({ex['side']})" if "side" in ex else ""
        print(f"--- {ex['file']}:{ex['line']}{side}  {ex['n_tokens']} tokens, {ex['n_trained']} "
              f"{'scored' if side else 'trained'}"
              f"{' (truncated)' if ex['truncated'] else ''}")
        parts = []
        for t in ex["tokens"]:
            if color:
                parts.append(f"{_GREEN if t['trained'] else _DIM}{t['text']}{_RESET}")
            else:
                parts.append(f"[{t['text']}]" if t["trained"] else t["text"])
        print("".join(parts))
        if "columns" in ex:
            print(f"reward columns: {json.dumps(ex['columns'], ensure_ascii=False)[:500]}")
    if not color:
        print("(trained tokens are shown in [brackets])")
