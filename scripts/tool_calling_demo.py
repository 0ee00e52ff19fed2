"""Tool calling on the tiny model, end to end, on CPU in a few minutes:

    python scripts/tool_calling_demo.py [--output-dir tool_demo_output] [--overwrite] [key=value ...]

    generated OpenAI-format chats that call get_price / convert / weather ─ data-prep build ─►
    train/val/test.jsonl ─ tiny-model (tokenizer trained on train.jsonl, template chatml_tools) ─►
    finetune train (LoRA) ─► finetune eval: function-name accuracy and argument exact match,
    base vs tuned, on held-out prompts ─ chat(..., tools=...) on one of them

Every argument can be read off the prompt ("Convert 120 USD to EUR." -> convert(amount=120,
from="USD", to="EUR")), so a model that learned the format and the copying gets them right. A chat
is one request, the call that answers it, and in one chat of four the tool's result (never
trained) and the assistant's answer from it; the other three end on the call, which is what a
held-out chat scores. `key=value` arguments override the training config (as for `finetune
train`), e.g. `training.epochs=2`. The figures go to OUTPUT_DIR/tool_demo.json.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Terse schemas: every chat carries all three in its system turn (with the template's preamble, about
# 220 of a chat's tokens), and on a CPU every token of it costs training time.
TOOLS = [
    {"type": "function", "function": {
        "name": "get_price", "parameters": {"type": "object", "properties": {"item": {"type": "string"}}}}},
    {"type": "function", "function": {
        "name": "convert", "parameters": {"type": "object", "properties": {
            "amount": {"type": "number"}, "from": {"type": "string"}, "to": {"type": "string"}}}}},
    {"type": "function", "function": {
        "name": "weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
]
COLORS = "red blue green black white oak steel amber ivory teal pink grey".split()
NOUNS = "kettle lamp chair desk mug clock vase rug stool shelf bowl fan".split()
CITIES = "Oslo Lima Pune Kyiv Accra Quito Perth Turin Hanoi Cork Bern Riga Porto Tunis Dakar Cusco".split()
CURRENCIES = "USD EUR GBP JPY CHF SEK".split()
AMOUNTS = [5, 10, 12, 20, 25, 40, 50, 75, 100, 120, 150, 200, 250, 300, 500, 1000]
ASK = {
    "get_price": ["How much is the {item}?", "What does the {item} cost?", "Price of the {item}, please.",
                  "Can you look up the price of the {item}?", "I want to buy the {item}. What is its price?"],
    "convert": ["Convert {amount} {src} to {dst}.", "How many {dst} is {amount} {src}?",
                "What is {amount} {src} in {dst}?", "Please change {amount} {src} into {dst}.",
                "I have {amount} {src}. How much is that in {dst}?"],
    "weather": ["What's the weather in {city}?", "Is it raining in {city} today?", "Weather for {city}, please.",
                "How is the weather in {city} right now?", "Tell me the weather in {city}."],
}
CONDITIONS = ["sunny", "rainy", "cloudy", "windy", "snowy"]
# Around each request, so that held-out prompts are new sentences, not repeats of training ones.
OPENERS = ["", "Hi! ", "Hello, ", "Quick question: ", "Please help: "]
CLOSERS = ["", " Thanks.", " Thank you!", " Be quick."]


def make_request(rng: random.Random, k: int) -> tuple[str, dict, str, str]:
    """(the user's request, the call that answers it, the tool's result, the assistant's answer)."""
    fn = rng.choice(["get_price", "convert", "weather"])
    if fn == "get_price":
        item = f"{rng.choice(COLORS)} {rng.choice(NOUNS)}"
        args, prompt = {"item": item}, rng.choice(ASK[fn]).format(item=item)
        price = f"${rng.randint(3, 99)}"
        result, answer = json.dumps({"item": item, "price": price}), f"The {item} costs {price}."
    elif fn == "convert":
        amount = rng.choice(AMOUNTS)
        src, dst = rng.sample(CURRENCIES, 2)
        args, prompt = {"amount": amount, "from": src, "to": dst}, rng.choice(ASK[fn]).format(
            amount=amount, src=src, dst=dst)
        value = f"{amount * rng.uniform(0.5, 1.5):.2f}"
        result, answer = json.dumps({"amount": float(value), "currency": dst}), f"{amount} {src} is {value} {dst}."
    else:
        city = rng.choice(CITIES)
        args, prompt = {"city": city}, rng.choice(ASK[fn]).format(city=city)
        cond = rng.choice(CONDITIONS)
        result, answer = json.dumps({"city": city, "condition": cond}), f"It is {cond} in {city}."
    call = {"id": f"call_{k}", "type": "function", "function": {"name": fn, "arguments": json.dumps(args)}}
    return rng.choice(OPENERS) + prompt + rng.choice(CLOSERS), call, result, answer


def make_example(rng: random.Random, *, end_on_call: bool) -> dict:
    """One chat: a request answered by a call, then (unless `end_on_call`) the tool's result and
    the assistant's answer from it."""
    prompt, call, result, answer = make_request(rng, 0)
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": None, "tool_calls": [call]}]
    if not end_on_call:
        messages += [{"role": "tool", "tool_call_id": call["id"], "content": result},
                     {"role": "assistant", "content": answer}]
    return {"tools": TOOLS, "messages": messages}


def make_examples(n: int, seed: int = 0, end_on_call: float = 0.75) -> list[dict]:
    rng = random.Random(seed)
    return [make_example(rng, end_on_call=rng.random() < end_on_call) for _ in range(n)]


TRAIN_CONFIG = {
    "adapter": "lora",
    "chat_template": "chatml_tools",
    "seed": 0,
    "max_length": 512,
    "training": {"epochs": 6, "batch_size": 16, "learning_rate": 3.0e-3, "warmup": 0.05, "logging_steps": 10,
                 "report_to": ["none"]},
    "lora": {"r": 32, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear",
             # The tiny base is randomly initialised: its embeddings and head must learn too.
             "modules_to_save": ["embed_tokens", "lm_head"]},
    "eval": {"after_train": True, "max_new_tokens": 48, "batch_size": 32},
}


def run(output_dir: str | Path = "tool_demo_output", *, n_examples: int = 3000, data_seed: int = 0,
        overwrite: bool = False, overrides: list[str] | None = None) -> dict:
    """The whole demo; returns (and writes to OUTPUT_DIR/tool_demo.json) its figures."""
    import yaml

    from data_prep.build import build
    from finetune.config import load_config
    from finetune.inference.load import chat, load_for_inference
    from finetune.tiny import build_tiny_model
    from finetune.training.recipe import train

    out = Path(output_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise SystemExit(f"{out} is not empty; pass --overwrite to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    raw = out / "raw" / "tool_chats.jsonl"
    raw.parent.mkdir()
    raw.write_text("".join(json.dumps(x) + "\n" for x in make_examples(n_examples, seed=data_seed)))
    data = out / "data"
    report = build([str(raw)], data, seed=0, val_fraction=0.05, test_fraction=0.15)
    # The held-out prompts end on the call being scored; a few go on to a text answer (text metrics).
    print(f"data-prep build: {report['counts']} (rejects by reason: {report['rejects_by_reason']})")

    base = build_tiny_model(out / "base-model", [data / "train.jsonl"])
    cfg_file = out / "train.yaml"
    cfg_file.write_text("# python scripts/tool_calling_demo.py (writes this file, then trains it)\n"
                        + yaml.safe_dump({**TRAIN_CONFIG, "model": str(base), "output_dir": str(out / "run"),
                                          "data": {"train": str(data / "train.jsonl"),
                                                   "eval": str(data / "val.jsonl")}},
                                         sort_keys=False))
    cfg = load_config(cfg_file, [f"eval.data={data / 'test.jsonl'}", *(overrides or [])])
    t_train = time.perf_counter()
    run_dir = train(cfg)
    train_s = time.perf_counter() - t_train

    models = json.loads((run_dir / "eval" / "report.json").read_text())["models"]
    model, tok = load_for_inference(run_dir / "adapter")
    first = next(json.loads(x) for x in (data / "test.jsonl").read_text().splitlines()
                 if json.loads(x)["messages"][-1].get("tool_calls"))
    reply = chat(model, tok, first["messages"][:-1], tools=first["tools"], max_new_tokens=cfg.eval.max_new_tokens)
    ext = {k: models[k]["extrinsic"] for k in ("base", "tuned")}

    def user_turns(split: str) -> set[str]:
        return {m["content"] for line in (data / f"{split}.jsonl").read_text().splitlines()
                for m in json.loads(line)["messages"] if m["role"] == "user"}

    # Held out means unseen: the tuned model's scores also on the held-out calls whose request
    # never occurs, word for word, in a training chat.
    seen = user_turns("train")
    unseen = [r["scores"] for r in map(json.loads, (run_dir / "eval" / "predictions.jsonl").open())
              if r["model"] == "tuned" and isinstance(r["reference"], list) and r["prompt"][-1]["content"] not in seen]

    summary = {
        "seconds_total": round(time.perf_counter() - t0, 1),
        "seconds_train_and_eval": round(train_s, 1),
        "train_examples": report["counts"]["train"],
        "test_tool_calls": ext["tuned"].get("n_tool_references"),
        "test_examples": ext["tuned"].get("n"),
        "test_requests_seen_in_training": len(user_turns("test") & seen),
        **{f"{k}_{m}": ext[k].get(m) for k in ("base", "tuned")
           for m in ("tool_name_accuracy", "tool_arguments_exact_match", "exact_match")},
        "test_tool_calls_unseen": len(unseen),
        **{f"tuned_{m}_unseen": sum(sc[m] for sc in unseen) / max(len(unseen), 1)
           for m in ("tool_name_accuracy", "tool_arguments_exact_match")},
        "prompt": first["messages"][-2]["content"],
        "reference_call": first["messages"][-1]["tool_calls"][0]["function"],
        "reply_tool_calls": [c["function"] for c in reply.tool_calls],
    }
    (out / "tool_demo.json").write_text(json.dumps(summary, indent=2))
    print(f"\nDone in {summary['seconds_total']:.0f} s (training + evaluation {train_s:.0f} s), "
          f"{summary['train_examples']} training chats, {summary['test_tool_calls']} held-out calls:\n"
          f"  function-name accuracy     base {summary['base_tool_name_accuracy']:.3f} -> "
          f"tuned {summary['tuned_tool_name_accuracy']:.3f}\n"
          f"  argument exact match       base {summary['base_tool_arguments_exact_match']:.3f} -> "
          f"tuned {summary['tuned_tool_arguments_exact_match']:.3f}\n"
          f"  on the {len(unseen)} calls whose request no training chat holds: name accuracy "
          f"{summary['tuned_tool_name_accuracy_unseen']:.3f}, argument exact match "
          f"{summary['tuned_tool_arguments_exact_match_unseen']:.3f}\n"
          f"  prompt:    {summary['prompt']!r}\n"
          f"  reference: {summary['reference_call']}\n"
          f"  chat():    {summary['reply_tool_calls']}\n"
          f"  report:    {run_dir / 'eval' / 'report.md'}")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="tool_demo_output")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--examples", type=int, default=3000, help="chats generated before data-prep (default 3000)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the generated chats (default 0)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="training config overrides")
    args = p.parse_args(argv)
    run(args.output_dir, n_examples=args.examples, data_seed=args.data_seed, overwrite=args.overwrite,
        overrides=args.overrides)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
