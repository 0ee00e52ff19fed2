"""`data-prep` command line: build, run, validate, stats."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

log = logging.getLogger("data_prep")


def _add_build(sub) -> None:
    p = sub.add_parser("build", help="build train/val/test chat JSONL from pages, texts and annotated files")
    p.add_argument(
        "sources",
        nargs="+",
        metavar="SOURCE",
        help="file, directory or glob (HTML, text, CSV/TSV/XLSX/JSON/JSONL)",
    )
    p.add_argument(
        "--output-dir", "-o", required=True, help="where train/val/test/rejects.jsonl and report.json go"
    )
    p.add_argument(
        "--task",
        default="sft",
        choices=["sft", "preference", "kto", "prompts"],
        help="sft: chat examples (default); preference: prompt/chosen/rejected pairs for DPO/ORPO/SimPO, "
        "split by prompt; kto: pairs and unpaired prompt/completion/label examples; prompts: prompt records for "
        "method grpo (reference answer optional, other columns kept for the reward functions), split by prompt",
    )
    p.add_argument("--system", default=None, help="system prompt added first to every example")
    p.add_argument(
        "--val-fraction", type=float, default=0.05, help="share of examples in val.jsonl (default 0.05)"
    )
    p.add_argument(
        "--test-fraction", type=float, default=0.1, help="share of examples in test.jsonl (default 0.1)"
    )
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    p.add_argument(
        "--workers", type=int, default=1, help="processes for HTML extraction, local engine (default 1)"
    )
    p.add_argument(
        "--engine",
        default="local",
        choices=["local", "ray"],
        help="local: this machine (default); ray: a Ray cluster, outputs as shard directories "
        "(pip install 'finetune-kit[ray]')",
    )
    p.add_argument(
        "--address",
        default=None,
        help="with --engine ray: `auto` (the cluster of `ray start`), HOST:PORT or ray://HOST:10001; "
        "default: $RAY_ADDRESS, else Ray started on this machine for this build",
    )
    p.add_argument(
        "--format",
        default="auto",
        choices=["auto", "html", "text", "transcript", "csv", "tsv", "xlsx", "json", "jsonl"],
        help="force the input format of every source (default: by extension and content)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace data-prep outputs in a non-empty output dir"
    )
    p.add_argument("--no-provenance", action="store_true", help="omit the `meta` (source, locator) key")
    p.add_argument(
        "--tokenizer", default=None, help="local tokenizer dir: context budget and lengths in tokens"
    )
    p.add_argument(
        "--context-budget", type=int, default=512, help="max words/tokens of a joined page (default 512)"
    )
    p.add_argument(
        "--near-dup-threshold", type=float, default=0.8, help="MinHash Jaccard threshold (default 0.8)"
    )


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="build from a recipe YAML (configs/data/) with key=value overrides")
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("overrides", nargs="*", help="dotted key=value, e.g. dedup.threshold=0.9")


def _add_validate(sub) -> None:
    p = sub.add_parser("validate", help="check a chat JSONL against the OpenAI fine-tuning format rules")
    p.add_argument("file")
    p.add_argument("--tokenizer", default=None, help="local tokenizer dir (default: count words)")
    p.add_argument("--max-tokens", type=int, default=16385, help="warn above this length (default 16385)")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.add_argument("--task", choices=["auto", "prompts"], default="auto",
                   help="auto: chat or preference records (the first record decides); prompts: prompt records for "
                   "`method: grpo` (a chat ending on the user's turn, or with its reference answer last)")


def _add_stats(sub) -> None:
    p = sub.add_parser("stats", help="counts and length distributions of a chat JSONL")
    p.add_argument("file")
    p.add_argument("--tokenizer", default=None, help="local tokenizer dir (default: count words)")


def _print_summary(report: dict[str, Any], out_dir: str) -> None:
    c, acc = report["counts"], report["accounting"]
    print(
        f"data-prep: {acc['records_in']} records in -> train {c['train']}, val {c['val']}, test {c['test']}, rejects {c['rejects']}"
        f" ({'balanced' if acc['balanced'] else 'NOT BALANCED'}) in {out_dir}"
    )
    if report.get("engine", {}).get("name") == "ray":
        print(f"  outputs: shard directories {', '.join(report['outputs'].values())} (each with manifest.json)")
    if report["task"] != "sft":
        g = report["split"]["groups"]
        what = ("prompt records (the reference answer, when given, as the last assistant turn)"
                if report["task"] == "prompts" else "TRL conversational preference lines")
        print(f"  task {report['task']}: {what}, split by prompt "
              f"(prompts: train {g['train']}, val {g['val']}, test {g['test']})")
    print(f"  context pages: {report['inputs']['context_pages']}, files: {report['inputs']['files']}")
    for name, s in report["steps"].items():
        dropped = ", ".join(f"{k} {v}" for k, v in s["dropped"].items())
        print(
            f"  {name:<12} in {s['in']:>7}  out {s['out']:>7}" + (f"  dropped: {dropped}" if dropped else "")
        )
    if report["rejects_by_reason"]:
        print("  rejects: " + ", ".join(f"{k} {v}" for k, v in report["rejects_by_reason"].items()))
    print("  pii redacted: " + ", ".join(f"{k} {v}" for k, v in report["pii"].items()))
    d = report["dedup"]
    print(
        f"  dedup: exact {d['exact_duplicates']}, near {d['near_duplicates']} (threshold {d['threshold']}), clusters {d['clusters']}"
    )
    print(f"  leakage (near-dup pairs test<->train): {report['leakage']['near_dup_pairs_test_train']}")
    lt = report["lengths"]["train"]
    if lt.get("n"):
        print(
            f"  train length ({report['lengths']['unit']}): mean {lt['mean']}, p50 {lt['p50']}, p90 {lt['p90']}, max {lt['max']}"
        )


def _print_validation(res, as_json: bool) -> None:
    if as_json:
        print(json.dumps(res.to_json(), indent=2))
        return
    for e in res.errors:
        print(f"line {e.line}: error {e.kind}" + (f": {e.detail}" if e.detail else ""))
    warn = res.to_json()["warning_counts"]
    print(
        f"{res.examples} examples, {len(res.errors)} errors"
        + (", warnings: " + ", ".join(f"{k} {v}" for k, v in warn.items()) if warn else "")
    )
    total = res.lengths.get("example_total", {})
    if total.get("n"):
        print(
            f"length ({res.lengths['unit']}): min {total['min']}, mean {total['mean']}, p50 {total['p50']}, p90 {total['p90']}, max {total['max']}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="data-prep", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_build(sub)
    _add_run(sub)
    _add_validate(sub)
    _add_stats(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )

    from data_prep.recipe import RecipeError
    from data_prep.writers import OutputDirError

    try:
        if args.command == "build":
            from data_prep.build import build

            report = build(
                args.sources,
                args.output_dir,
                task=args.task,
                system=args.system,
                val_fraction=args.val_fraction,
                test_fraction=args.test_fraction,
                seed=args.seed,
                workers=args.workers,
                format=args.format,
                overwrite=args.overwrite,
                provenance=not args.no_provenance,
                tokenizer=args.tokenizer,
                context={"budget": args.context_budget},
                dedup={"threshold": args.near_dup_threshold},
                engine=args.engine,
                ray={"address": args.address},
            )
            _print_summary(report, args.output_dir)
            return 0 if report["accounting"]["balanced"] else 1
        if args.command == "run":
            from data_prep.build import run_recipe
            from data_prep.recipe import load_recipe

            recipe = load_recipe(args.recipe, args.overrides)
            report = run_recipe(recipe)
            _print_summary(report, recipe.output_dir)
            return 0 if report["accounting"]["balanced"] else 1
        if args.command == "validate":
            from data_prep.validate import validate_file

            res = validate_file(args.file, args.tokenizer, args.max_tokens, prompts=args.task == "prompts")
            _print_validation(res, args.json)
            return 0 if res.ok else 1
        if args.command == "stats":
            from data_prep.validate import stats_file

            print(json.dumps(stats_file(args.file, args.tokenizer), indent=2))
            return 0
    except (RecipeError, OutputDirError, FileNotFoundError) as err:
        print(f"data-prep: error: {err}", file=sys.stderr)
        return 2
    except ImportError as err:
        if "pip install" not in str(err):  # a missing optional extra says what to install; a bug does not
            raise
        print(f"data-prep: error: {err}", file=sys.stderr)
        return 2
    return 2
