"""`finetune` command line: one subcommand per module, heavy imports only inside each command.

    finetune train CONFIG.yaml [key=value ...]      accelerate launch -m finetune train CONFIG.yaml
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import sys

from finetune.config import ConfigError, describe_schema, load_config
from finetune.inference.generate import add_generate_arguments
from finetune.plan.command import add_plan_arguments

COMMANDS = {
    "train": "Fine-tune a model (LoRA, QLoRA or full) from a YAML config plus key=value overrides.",
    "prepare": "Tokenize the training data into its on-disk cache ahead of the launch (worker processes).",
    "preview": "Show the tokens of the first examples and which ones are trained (loss masks).",
    "eval": "Evaluate a base model and/or an adapter: perplexity, bits/byte, task metrics, report.",
    "generate": "Answer a JSONL file of prompts or chats with a model (a teacher) or an adapter, as chat JSONL for SFT.",
    "chat": "Chat with an adapter in the terminal (streams tokens; /reset, /exit).",
    "merge": "Merge an adapter into its base model and save a standalone model directory.",
    "export": "Export a merged adapter (or the adapter alone) as GGUF for llama.cpp, Ollama and LM Studio.",
    "plan": "Predict per-device memory (weights, optimizer, activations) and whether a config fits.",
    "sweep": "Hyperparameter search on Optuna: many training runs in one resumable study, shared by workers.",
    "tiny-model": "Build a small Llama model and a locally trained tokenizer (for tests and demos).",
    "quickstart": "Run the whole path on CPU: data prep, tiny model, LoRA training, eval, inference.",
    "verify": "Check a run, adapter, model, checkpoint, data cache, data-prep output or GGUF file against its checksums.",
    "env": "Report this environment for a bug report: versions against the tested ranges, GPUs, CUDA, kernels.",
}


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config (see configs/train/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. lora.r=16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finetune",
        description="Distributed LLM fine-tuning: LoRA/QLoRA under DeepSpeed ZeRO, evaluation, inference.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    p = sub.add_parser("train", help=COMMANDS["train"], description=COMMANDS["train"])
    _add_config_args(p)
    p.add_argument("--help-config", action="store_true", help="list every config key and exit")
    p.add_argument("--force", action="store_true", help="train even if `finetune plan` predicts it will not fit")

    p = sub.add_parser("plan", help=COMMANDS["plan"], description=COMMANDS["plan"])
    add_plan_arguments(p)

    p = sub.add_parser("prepare", help=COMMANDS["prepare"], description=COMMANDS["prepare"])
    _add_config_args(p)
    p.add_argument("--num-proc", type=int, help="tokenizer worker processes (default: data.num_proc, else the "
                   "cores available, bounded by memory)")

    p = sub.add_parser("preview", help=COMMANDS["preview"], description=COMMANDS["preview"])
    _add_config_args(p)
    p.add_argument("--n", type=int, default=3, help="number of examples (default 3)")
    p.add_argument("--json", action="store_true", help="print JSON: per example a list of {token, text, trained}")
    p.add_argument("--split", choices=["train", "eval"], default="train")

    p = sub.add_parser("eval", help=COMMANDS["eval"], description=COMMANDS["eval"])
    p.add_argument("--model", help="base model directory or hub id (default: read from the adapter)")
    p.add_argument("--adapter", help="adapter directory (a run's adapter/)")
    p.add_argument("--tuned-model", help="a fully fine-tuned model directory (a run's model/) to score "
                   "against --model, the base it was trained from")
    p.add_argument("--data", required=True, help="held-out chat JSONL (the last assistant turn is the reference)")
    p.add_argument("--output", required=True, help="report directory")
    p.add_argument("--metrics", default="exact_match,f1,rouge_l,chrf",
                   help="comma-separated builtin names or module:function")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-examples", type=int)
    p.add_argument("--loss-on", choices=["assistant", "last_assistant", "all"], default="assistant")
    p.add_argument("--max-length", type=int, help="truncate each example to this many tokens for the loss "
                   "metrics (default: no limit; use the training run's max_length to score what it trained on)")
    p.add_argument("--quantize", choices=["auto", "none", "4bit", "8bit"], default="auto",
                   help="how to load the base: auto = as the adapter was trained (4-bit for QLoRA), "
                   "none = full precision (default: auto)")
    p.add_argument("--run-dir", help="training run directory, for the loss curve in the report")
    p.add_argument("--lm-eval-tasks", help="comma-separated lm-evaluation-harness tasks")
    p.add_argument("--lm-eval-include", help="directory of extra lm-eval task YAMLs")
    p.add_argument("--teacher", default="auto", help="also report each model's KL to this teacher (directory or hub "
                   "id; it must share the tokenizer): auto = a distillation run's own teacher (default), none = no KL")
    p.add_argument("--teacher-adapter", help="a LoRA adapter applied to --teacher")
    p.add_argument("--teacher-4bit", action="store_true", help="load --teacher in 4-bit NF4")
    p.add_argument("--rewards", default="auto", help="score one greedy reply per prompt record of --data with reward "
                   "functions: auto = a grpo run's own (default), none = the text metrics, or a JSON list of specs "
                   "as in grpo.rewards")

    p = sub.add_parser("generate", help=COMMANDS["generate"], description=COMMANDS["generate"])
    add_generate_arguments(p)

    p = sub.add_parser("chat", help=COMMANDS["chat"], description=COMMANDS["chat"])
    p.add_argument("--adapter", required=True)
    p.add_argument("--model", help="override the base model recorded in the adapter")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--tools", help="JSON file with a list of tools (OpenAI format) the model may call; "
                   "each call is shown and you type its result")
    p.add_argument("--quantize", choices=["auto", "none", "4bit", "8bit"], default="auto",
                   help="how to load the base: auto = as the adapter was trained (4-bit for QLoRA), "
                   "none = full precision (default: auto)")
    p.add_argument("--max-new-tokens", type=int, default=256)

    p = sub.add_parser("merge", help=COMMANDS["merge"], description=COMMANDS["merge"])
    p.add_argument("--adapter", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--model", help="override the base model recorded in the adapter")

    p = sub.add_parser("export", help=COMMANDS["export"], description=COMMANDS["export"])
    p.add_argument("--adapter", help="adapter directory (a run's adapter/): merged into its base, then converted")
    p.add_argument("--model", help="without --adapter: the model directory to convert (e.g. a `finetune merge` "
                   "output); with --adapter: overrides the base model the adapter names")
    p.add_argument("--format", choices=["gguf"], default="gguf")
    p.add_argument("--quant", default="f16", choices=["f32", "f16", "bf16", "q8_0", "q4_0"],
                   help="tensor type of the matrices (norms and biases stay f32; default f16)")
    p.add_argument("--output", required=True, help="directory for the .gguf file and the Ollama Modelfile")
    p.add_argument("--adapter-only", action="store_true",
                   help="write the adapter alone in llama.cpp's LoRA layout, to apply on a base GGUF")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of the merge (default auto: float32 on CPU; bfloat16 halves its memory)")
    p.add_argument("--base-gguf", help="with --adapter-only: the base GGUF the Modelfile's FROM names "
                   "(default: the base model directory)")

    p = sub.add_parser("tiny-model", help=COMMANDS["tiny-model"], description=COMMANDS["tiny-model"])
    p.add_argument("--output", required=True, help="directory to write the model and tokenizer to")
    p.add_argument("--corpus", nargs="*", help="text/JSONL files or directories to train the tokenizer on")
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer-from", help="reuse this model directory's tokenizer (e.g. a student for a teacher)")

    p = sub.add_parser("quickstart", help=COMMANDS["quickstart"], description=COMMANDS["quickstart"])
    p.add_argument("--output-dir", default="quickstart_output")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p = sub.add_parser("verify", help=COMMANDS["verify"], description=COMMANDS["verify"])
    p.add_argument("path", help="a run directory, adapter, model, checkpoint, data cache, data-prep output or file")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--record", action="store_true", help="(re)write the directory's checksums.json instead: after "
                   "a deliberate edit, or for an artifact from before checksums existed")
    p = sub.add_parser("env", help=COMMANDS["env"], description=COMMANDS["env"])
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    from finetune.sweep import add_sweep_arguments  # light: optuna is imported inside the command

    p = sub.add_parser("sweep", help=COMMANDS["sweep"], description=COMMANDS["sweep"])
    add_sweep_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from kitcore.runtime import launch_env

    if launch_env()[0] != 0:  # one rank talks; the others only warn
        logging.getLogger().setLevel(logging.WARNING)
    # bitsandbytes warns on every import that an optional CPU kernel package is absent; it is not
    # needed (QLoRA runs without it), so the warning only hides real messages.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    if not args.command:
        parser.print_help()
        return 2
    config = getattr(args, "config", None)
    if config and "=" in config and not os.path.exists(config):
        # `finetune train model=X data.train=Y ...`: no YAML, every key given as an override.
        args.overrides.insert(0, config)
        args.config = None
    import signal

    if hasattr(signal, "SIGXFSZ"):
        # Past a file-size limit the kernel kills the process unless SIGXFSZ is ignored; ignored,
        # the write fails with EFBIG and the kit reports which file could not be written.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        return _dispatch(args) or 0
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # user-facing errors of our own carry the fix in their message
        from finetune.errors import USER_ERRORS, Preempted

        if isinstance(exc, Preempted):
            from finetune.training.recipe import PREEMPTED_EXIT_CODE

            return PREEMPTED_EXIT_CODE
        if isinstance(exc, USER_ERRORS):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise


def _dispatch(args: argparse.Namespace) -> int | None:
    cmd = args.command
    if cmd == "train":
        if args.help_config:
            print("\n".join(describe_schema()))
            return 0
        if args.force:
            args.overrides.append("force=true")
        cfg = load_config(args.config, args.overrides)
        from kitcore.runtime import single_process_gpu

        # Before torch is imported: CUDA reads it once, at initialisation. Said only where GPUs are
        # (a device node exists): on a CPU machine the pin changes nothing.
        if single_process_gpu() and glob.glob("/dev/nvidia[0-9]*"):
            logging.getLogger("finetune").info(
                "one process without a launcher: training on GPU 0 only (CUDA_VISIBLE_DEVICES=0); "
                "use `accelerate launch` for data parallel")
        from finetune.training.recipe import train

        train(cfg)
    elif cmd == "prepare":
        cfg = load_config(args.config, args.overrides)
        from finetune.data.prepare import prepare

        prepare(cfg, num_proc=args.num_proc)
    elif cmd == "preview":
        cfg = load_config(args.config, args.overrides)
        from finetune.data.preview import preview

        preview(cfg, n=args.n, as_json=args.json, split=args.split)
    elif cmd == "eval":
        from finetune.eval.evaluation import eval_command

        return eval_command(args)
    elif cmd == "generate":
        from finetune.inference.generate import generate_command

        return generate_command(args)
    elif cmd == "chat":
        from finetune.inference.load import chat_command

        return chat_command(args)
    elif cmd == "merge":
        from finetune.inference.load import merge_command

        return merge_command(args)
    elif cmd == "export":
        from finetune.export.gguf import export_command

        return export_command(args)
    elif cmd == "plan":
        from finetune.plan.command import plan_command

        return plan_command(args)
    elif cmd == "sweep":
        from finetune.sweep import sweep_command

        return sweep_command(args)
    elif cmd == "tiny-model":
        from finetune.tiny import build_tiny_model

        out = build_tiny_model(args.output, args.corpus, vocab_size=args.vocab_size,
                               hidden_size=args.hidden_size, layers=args.layers, seed=args.seed,
                               tokenizer_from=args.tokenizer_from)
        print(f"tiny model -> {out}")
    elif cmd == "verify":
        from finetune.verify import verify_command

        return verify_command(args)
    elif cmd == "env":
        from finetune.env import env_command

        return env_command(args)
    elif cmd == "quickstart":
        from finetune.quickstart import quickstart

        quickstart(args.output_dir, overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
