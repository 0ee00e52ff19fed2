#!/usr/bin/env python
"""Logit-level distillation against SFT: the same student, data and budget; which one ends closer
to the teacher on held-out conversations?

    python scripts/bench_distill.py            # ~15 min on 2 CPU cores
    python scripts/bench_distill.py --smoke    # toy size (run by the tests)

1. Data: the quickstart's task (read the price of a product out of a short catalogue), generated
   here: `--train` conversations to train on, `--held-out` others to score.
2. Teacher: a random-init Llama (hidden 256, 4 layers, GQA 4/2, a byte-level BPE tokenizer trained
   on the training data), fine-tuned in full on the data by `finetune train` (--teacher-epochs).
3. Student: a smaller Llama (hidden 128, 2 layers) on the teacher's tokenizer, fine-tuned in full
   twice from the same initial weights, with the same data order, steps, batch and learning rate:
   `method: sft`, and `method: distill` with the teacher (distill.alpha, temperature, divergence as
   given; the defaults are the config's).
4. `finetune eval` of each (the initial student as the base, the trained one as tuned) with the
   teacher: the held-out KL(teacher || student) per assistant token (intrinsic kl_to_teacher), the
   held-out NLL of the data's answers, and exact match of greedy answers.

The figures printed are the tuned students' KL to the teacher; docs/benchmarks.md has a full-size run.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COLORS = ["red", "blue", "green", "oak", "steel", "amber", "ivory", "teal", "black", "white"]
ITEMS = ["kettle", "lamp", "chair", "desk", "mug", "vase", "clock", "rug", "shelf", "stool"]


def make_chats(n: int, seed: int) -> list[dict]:
    """Price look-up chats: a catalogue of three products, a question about one, its price."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prods = {f"{rng.choice(COLORS)} {rng.choice(ITEMS)}": f"${rng.randint(3, 99)}" for _ in range(3)}
        name, price = rng.choice(sorted(prods.items()))
        ctx = " ".join(f"The {k} costs {v}." for k, v in prods.items())
        out.append({"messages": [{"role": "user", "content": f"{ctx}\n\nHow much is the {name}?"},
                                 {"role": "assistant", "content": price}]})
    return out


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(args) -> dict:
    from finetune.config import load_config
    from finetune.eval.evaluation import evaluate
    from finetune.tiny import build_tiny_model
    from finetune.training.recipe import train

    work = Path(args.work).resolve()
    if work.exists():
        import shutil

        shutil.rmtree(work)
    train_file = _write(work / "train.jsonl", make_chats(args.train, seed=0))
    held_out = _write(work / "held_out.jsonl", make_chats(args.held_out, seed=1))
    common = [f"data.train={train_file}", "adapter=full", "max_length=128", f"training.batch_size={args.batch}", "training.warmup=0.05", "training.logging_steps=10",
              "training.report_to=[none]", "training.save_steps=100000", "seed=0"]
    res: dict = {"settings": vars(args).copy()}
    t0 = time.perf_counter()

    print(f"[1/4] teacher: hidden {args.teacher_hidden}, {args.teacher_layers} layers, fine-tuned in full on "
          f"{args.train} conversations", flush=True)
    teacher_base = build_tiny_model(work / "teacher-base", [train_file], vocab_size=400,
                                    hidden_size=args.teacher_hidden, layers=args.teacher_layers, heads=4, kv_heads=2,
                                    max_positions=256)
    train(load_config(None, [*common, f"model={teacher_base}", f"output_dir={work / 'teacher-run'}",
                             f"training.epochs={args.teacher_epochs}", f"training.learning_rate={args.teacher_lr}"]))
    teacher = work / "teacher-run" / "model"

    student_base = build_tiny_model(work / "student-base", tokenizer_from=teacher_base, hidden_size=args.student_hidden,
                                    layers=args.student_layers, heads=4, kv_heads=2, max_positions=256, seed=1)
    d = [f"distill.alpha={args.alpha}", f"distill.temperature={args.temperature}",
         f"distill.divergence={args.divergence}"]
    arms = {"sft": ["method=sft"], "distill": ["method=distill", f"distill.teacher={teacher}", *d]}
    for i, (arm, extra) in enumerate(arms.items(), 2):
        print(f"[{i}/4] student, method {arm}: hidden {args.student_hidden}, {args.student_layers} layers", flush=True)
        t = time.perf_counter()
        run_dir = work / f"student-{arm}"
        train(load_config(None, [*common, f"model={student_base}", f"output_dir={run_dir}",
                                 f"training.epochs={args.epochs}", f"training.learning_rate={args.student_lr}", *extra]))
        logged = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        res[arm] = {"train_s": round(time.perf_counter() - t, 1), "steps": max(m["step"] for m in logged),
                    "examples_seen": json.loads((run_dir / "run.json").read_text())["data_stats"]["train"]["kept"]}

    print("[4/4] finetune eval with the teacher: held-out KL to it, NLL, exact match", flush=True)
    for arm in arms:
        report = evaluate(data=held_out, model=str(student_base), tuned_model=work / f"student-{arm}" / "model",
                          output=work / f"eval-{arm}", metrics=["exact_match"], max_new_tokens=6,
                          teacher=str(teacher), distributed=False)
        base, tuned = (report["models"][k] for k in ("base", "tuned"))
        res[arm].update(kl_to_teacher=tuned["intrinsic"]["kl_to_teacher"], nll=tuned["intrinsic"]["nll"],
                        exact_match=tuned["extrinsic"]["exact_match"], tokens=tuned["intrinsic"]["tokens"])
        res["initial_student"] = {"kl_to_teacher": base["intrinsic"]["kl_to_teacher"], "nll": base["intrinsic"]["nll"]}
    teacher_report = evaluate(data=held_out, model=str(teacher), output=work / "eval-teacher", metrics=["exact_match"],
                              max_new_tokens=6, teacher="none", distributed=False)
    res["teacher"] = {"nll": teacher_report["models"]["base"]["intrinsic"]["nll"],
                      "exact_match": teacher_report["models"]["base"]["extrinsic"]["exact_match"]}
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


def report(res: dict) -> str:
    s, k, i, t = res["sft"], res["distill"], res["initial_student"], res["teacher"]
    a = res["settings"]
    lines = [
        f"held-out: {a['held_out']} conversations, {s['tokens']} assistant tokens; teacher: NLL {t['nll']:.4f}, "
        f"exact match {t['exact_match']:.3f}",
        f"{'student':28s} {'KL to teacher':>14s} {'NLL':>8s} {'exact match':>12s} {'train s':>8s}",
        f"{'initial (random)':28s} {i['kl_to_teacher']:14.4f} {i['nll']:8.4f} {'':>12s} {'':>8s}",
        f"{'SFT':28s} {s['kl_to_teacher']:14.4f} {s['nll']:8.4f} {s['exact_match']:12.3f} {s['train_s']:8.1f}",
        f"{'distill (alpha ' + str(a['alpha']) + ', T ' + str(a['temperature']) + ', ' + a['divergence'] + ')':28s} "
        f"{k['kl_to_teacher']:14.4f} {k['nll']:8.4f} {k['exact_match']:12.3f} {k['train_s']:8.1f}",
        f"distilled student's KL to the teacher: {k['kl_to_teacher']:.4f} vs SFT's {s['kl_to_teacher']:.4f} "
        f"({k['kl_to_teacher'] / s['kl_to_teacher']:.2f}x); whole run {res['seconds']:.0f} s",
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="bench_output/distill")
    ap.add_argument("--train", type=int, default=3000, help="training conversations")
    ap.add_argument("--held-out", type=int, default=200, help="held-out conversations")
    ap.add_argument("--epochs", type=float, default=3, help="the students' epochs")
    ap.add_argument("--teacher-epochs", type=float, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--teacher-hidden", type=int, default=256)
    ap.add_argument("--teacher-layers", type=int, default=4)
    ap.add_argument("--teacher-lr", type=float, default=1e-3)
    ap.add_argument("--student-hidden", type=int, default=128)
    ap.add_argument("--student-layers", type=int, default=2)
    ap.add_argument("--student-lr", type=float, default=2e-3)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--divergence", default="forward", choices=["forward", "reverse", "jsd"])
    ap.add_argument("--smoke", action="store_true", help="toy size: 160 conversations, smaller models")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.smoke:
        args.train, args.held_out, args.epochs, args.batch = 160, 24, 4, 16
        args.teacher_hidden, args.student_hidden, args.teacher_epochs, args.teacher_lr = 64, 32, 4, 3e-3
    res = run(args)
    print(report(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
