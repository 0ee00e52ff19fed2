"""`finetune quickstart`: the whole path on a CPU in a few minutes, with data that ships here.

    sample pages + annotations ─ data-prep build ─► train/val/test.jsonl
    ─ tiny-model (tokenizer trained on train.jsonl) ─► base-model/
    ─ finetune train (LoRA) ─► run/adapter ─ finetune eval (base vs tuned on test) ─► run/eval/report.*
    ─ load_for_inference + chat ─► one held-out answer
"""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

from finetune.errors import RunDirError

__all__ = ["quickstart", "QUICKSTART_DATA"]

QUICKSTART_DATA = Path(str(resources.files("finetune") / "quickstart_data"))


def _step(n: int, text: str) -> None:
    print(f"\n[{n}/5] {text}", flush=True)


def quickstart(output_dir: str | Path = "quickstart_output", *, overwrite: bool = False,
               overrides: list[str] | None = None) -> dict:
    from data_prep.build import build
    from finetune.config import load_config
    from finetune.inference.load import chat, load_for_inference
    from finetune.tiny import build_tiny_model
    from finetune.training.recipe import train

    out = Path(output_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise RunDirError(f"{out} is not empty; pass --overwrite to replace it or --output-dir to pick another")
    if out.exists() and overwrite:
        import shutil

        shutil.rmtree(out)
    t0 = time.perf_counter()

    _step(1, f"data-prep build: {QUICKSTART_DATA / 'pages'} + {QUICKSTART_DATA / 'questions.csv'}")
    data = out / "data"
    build([str(QUICKSTART_DATA / "pages"), str(QUICKSTART_DATA / "questions.csv")], data,
          seed=0, val_fraction=0.05, test_fraction=0.1)

    _step(2, "tiny-model: a 4-layer Llama and a byte-level BPE tokenizer trained on train.jsonl")
    base = build_tiny_model(out / "base-model", [data / "train.jsonl"], vocab_size=512)

    _step(3, "finetune train: LoRA on the tiny model (then base vs tuned eval on the test split)")
    cfg = load_config(
        QUICKSTART_DATA / "train.yaml",
        [f"model={base}", f"output_dir={out / 'run'}", f"data.train={data / 'train.jsonl'}",
         f"data.eval={data / 'val.jsonl'}", f"eval.data={data / 'test.jsonl'}", *(overrides or [])],
    )
    t_train = time.perf_counter()
    run = train(cfg)
    train_s = time.perf_counter() - t_train

    _step(4, "report")
    report = json.loads((run / "eval" / "report.json").read_text())
    models = report["models"]

    _step(5, "load_for_inference(adapter) + chat on one held-out prompt")
    model, tok = load_for_inference(run / "adapter")
    first = json.loads((data / "test.jsonl").read_text().splitlines()[0])
    prompt = [m for m in first["messages"] if m["role"] != "assistant"]
    reply = chat(model, tok, prompt, max_new_tokens=cfg.eval.max_new_tokens)
    print(f"  prompt:    {prompt[-1]['content']!r}")
    print(f"  reference: {first['messages'][-1]['content']!r}")
    print(f"  reply:     {reply!r}")

    total = time.perf_counter() - t0
    summary = {
        "seconds_total": round(total, 1),
        "seconds_train": round(train_s, 1),
        "test_examples": report["models"]["tuned"]["extrinsic"].get("n"),
        "base_exact_match": models["base"]["extrinsic"].get("exact_match"),
        "tuned_exact_match": models["tuned"]["extrinsic"].get("exact_match"),
        "base_perplexity": models["base"]["intrinsic"].get("perplexity"),
        "tuned_perplexity": models["tuned"]["intrinsic"].get("perplexity"),
        "reply": reply,
    }
    (out / "quickstart.json").write_text(json.dumps(summary, indent=2))
    print(
        f"\nDone in {total:.0f} s (training + evaluation {train_s:.0f} s). Exact match on {summary['test_examples']} "
        f"held-out examples: base {summary['base_exact_match']:.2f} -> tuned {summary['tuned_exact_match']:.2f}"
        f"\n  data:    {data}/{{train,val,test,rejects}}.jsonl, report.json"
        f"\n  model:   {base}"
        f"\n  adapter: {run / 'adapter'}"
        f"\n  report:  {run / 'eval' / 'report.md'} (+ loss_curve.png, metrics_bars.png, predictions.jsonl)"
        f"\n  load it: from finetune import load_for_inference; "
        f"model, tok = load_for_inference('{run / 'adapter'}')"
    )
    return summary
