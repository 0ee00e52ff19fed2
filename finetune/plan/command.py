"""`finetune plan` (and `python -m finetune.plan`), and the plan of a training run about to start:
the entry points over finetune.plan.memory."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from finetune.plan.memory import Plan, make_plan, plan_from_batch, render_plan, setup_from_config
from finetune.plan.shapes import GiB, ModelShape, fmt_bytes, parse_size, resolve_model_config

__all__ = ["load_plan_config", "plan_for_training", "run_longest_batch", "resolve_token_budget", "resolve_batch_size", "trained_counter", "data_batch_inputs", "add_plan_arguments", "plan_command", "main"]

DESCRIPTION = "`finetune plan`: will this run fit? A per-device memory plan from `config.json` alone."
REPO = Path(__file__).resolve().parents[2]


def load_plan_config(path: str | Path, overrides: list[str] | None = None):
    """The training config through the real schema, with data file checks switched off.

    Data paths are replaced by the recipe file itself (an existing file) before validation, so every
    other key is still checked by pydantic exactly as `finetune train` checks it; a DeepSpeed path that
    does not resolve from the current directory is retried from the repository root.
    """
    import yaml

    from finetune.config import load_config, parse_overrides

    raw = yaml.safe_load(Path(path).read_text()) if Path(path).is_file() else {}
    raw = raw if isinstance(raw, dict) else {}
    # Planning needs no data and no adapter to continue from (init_adapter names a run that may not
    # exist yet on the machine that plans).
    extra: dict[str, Any] = {"data": {"train": str(path)}, "eval": {"data": None}, "init_adapter": None}
    if isinstance(raw.get("data"), dict) and raw["data"].get("eval") is not None:
        extra["data"]["eval"] = str(path)
    ds = parse_overrides(overrides or []).get("deepspeed", raw.get("deepspeed"))
    if isinstance(ds, str) and not Path(ds).is_file() and not (Path(path).parent / ds).is_file() \
            and (REPO / ds).is_file():
        extra["deepspeed"] = str(REPO / ds)
    return load_config(path, overrides, **extra)


def plan_for_training(cfg, *, world_size: int = 1, gpus_per_node: int | None = None, device: str | None = None,
                      device_memory: int | None = None, lengths=None, batch=None) -> Plan:
    """The plan for a run about to start (used by `finetune train` before loading the model).
    `lengths`: the training examples' token lengths (the data cache's `length` column), or `batch`, the
    longest micro-batch found from them (run_longest_batch); with either the plan is for that
    micro-batch, else for max_length rows."""
    raw, src = resolve_model_config(cfg.model)
    shape = ModelShape.from_config(raw, src)
    gpn = gpus_per_node or min(world_size, 8)
    s = setup_from_config(cfg, nodes=max(1, world_size // gpn), gpus_per_node=gpn, device=device or "gpu",
                          device_memory=device_memory or 80 * GiB)
    if batch is None and lengths is not None:
        batch = run_longest_batch(cfg, lengths, world_size=world_size)
    return make_plan(shape, s) if batch is None else plan_from_batch(shape, s, batch)


def run_longest_batch(cfg, lengths, *, world_size: int = 1, trained_of=None, mean_trained: float | None = None,
                      heavy_early: bool = False):
    """The longest micro-batch of this run (finetune.plan.batches), with its sampler's settings and as
    many micro-batches as it will consume; with `trained_of` (example ids -> their trained tokens,
    trained_counter) and the data's mean trained tokens per example, its trained tokens too."""
    import math

    from finetune.plan.batches import longest_batch, longest_budget_batch, with_trained_tokens

    t = cfg.training
    room = cfg.method_spec.completion_room(cfg)
    if room:
        # A generating method draws its prompts with TRL's sampler (finetune.plan.batches.rollout_generations,
        # replayed); `lengths` are prompt + completion room already (finetune.data.prompts).
        from finetune.plan.batches import longest_rollout_batch

        group, iterations = cfg.method_spec.rollout_groups(cfg)
        return longest_rollout_batch(lengths, room, batch_size=t.batch_size, grad_accum=t.grad_accum,
                                     world_size=world_size, group=group, iterations=iterations, seed=cfg.seed,
                                     epochs=math.ceil(t.epochs),
                                     micro_batches=t.max_steps * t.grad_accum if t.max_steps and t.max_steps > 0
                                     else None)
    sampler = None
    if t.tokens_per_batch:
        from finetune.data.sampler import TokenBudgetBatchSampler

        sampler = TokenBudgetBatchSampler(lengths, t.tokens_per_batch, seed=cfg.seed, packing=cfg.packed,
                                          num_replicas=world_size, step_batches=t.grad_accum * world_size if heavy_early else 0)
        n_batches = len(sampler)
    else:
        n_batches = max(1, math.ceil(len(lengths) / t.batch_size))
    if t.max_steps and t.max_steps > 0:
        micro = t.max_steps * t.grad_accum * world_size
        epochs = math.ceil(micro / n_batches)
    else:
        micro, epochs = None, math.ceil(t.epochs)
    if t.tokens_per_batch:
        batch = longest_budget_batch(lengths, t.tokens_per_batch, seed=cfg.seed, packing=cfg.packed,
                                     num_replicas=world_size, epochs=epochs, micro_batches=micro, sampler=sampler)
    else:
        batch = longest_batch(lengths, t.batch_size, group_by_length=t.group_by_length, window=t.group_window,
                              seed=cfg.seed, packing=cfg.packed, epochs=epochs, micro_batches=micro,
                              step_batches=t.grad_accum * world_size if heavy_early else 0)
    if trained_of is not None and mean_trained is not None:
        batch = with_trained_tokens(batch, trained_of, mean_trained)
    return batch


def resolve_token_budget(cfg, *, world_size: int = 1, gpus_per_node: int | None = None, device: str = "gpu",
                         device_memory: int, memory_note: str = "") -> tuple[int, int, str]:
    """`training.tokens_per_batch: auto` -> (budget, grad_accum, what was decided, in words).

    The budget is the largest whose plan fits `device_memory` with `training.memory_margin` to spare,
    planned for its densest micro-batch (ceil(budget / max_length) rows of max_length tokens: no
    batch of that budget holds more), so it fits whatever the data. grad_accum then makes a step hold
    `training.tokens_per_step` over all ranks (the budget rounded down so that the product does not
    pass it)."""
    L = cfg.max_length
    return _largest_fitting(cfg, "tokens_per_batch", "tokens_per_step", cfg.training.tokens_per_step, L,
                            lambda budget: (-(-budget // L), L), world_size=world_size, gpus_per_node=gpus_per_node,
                            device=device, device_memory=device_memory, memory_note=memory_note,
                            unit_words=f"one row of max_length ({L}) tokens")


def resolve_batch_size(cfg, *, world_size: int = 1, gpus_per_node: int | None = None, device: str = "gpu",
                       device_memory: int, memory_note: str = "", longest: int | None = None) -> tuple[int, int, str]:
    """`training.batch_size: auto` -> (batch size, grad_accum, what was decided, in words).

    The batch size is the largest whose plan fits `device_memory` with `training.memory_margin` to
    spare, planned for its heaviest micro-batch: that many rows of the data's longest example
    (`longest`, truncated to max_length; a padded batch is never longer than its longest row), or of
    max_length without data or with packing. grad_accum then makes a step hold
    `training.examples_per_step` over all ranks."""
    seq = cfg.max_length if (longest is None or cfg.packed) else max(1, min(int(longest), cfg.max_length))
    return _largest_fitting(cfg, "batch_size", "examples_per_step", cfg.training.examples_per_step, 1,
                            lambda rows: (rows, seq), world_size=world_size, gpus_per_node=gpus_per_node,
                            device=device, device_memory=device_memory, memory_note=memory_note,
                            unit_words=f"one example of {seq} tokens", exact_step=True)


def _largest_fitting(cfg, key: str, step_key: str, per_step: int, least: int, shape_of, *, world_size: int,
                     gpus_per_node: int | None, device: str, device_memory: int, memory_note: str,
                     unit_words: str, exact_step: bool = False) -> tuple[int, int, str]:
    """The largest micro-batch (in `key`'s unit, at least `least`) whose plan, for the micro-batch
    `shape_of(value)` = (rows, tokens per row), fits with the margin; and the grad_accum that makes an
    optimizer step hold `per_step` over all ranks."""
    import dataclasses
    import math

    from finetune.config import ConfigError

    t = cfg.training
    raw, src = resolve_model_config(cfg.model)
    shape = ModelShape.from_config(raw, src)
    gpn = gpus_per_node or min(world_size, 8)
    s = setup_from_config(cfg.model_copy(update={"training": t.model_copy(update={"batch_size": 1})}),
                          nodes=max(1, world_size // gpn), gpus_per_node=gpn, device=device, device_memory=device_memory)
    limit = (1 - t.memory_margin) * device_memory

    def fits(value: int) -> bool:
        rows, seq = shape_of(value)
        plan = make_plan(shape, dataclasses.replace(s, micro_batch=rows, seq_len=seq), alternatives=False)
        return plan.device_total <= limit

    per_rank = per_step // world_size
    if per_rank < least:
        raise ConfigError("training config", [(f"training.{step_key}", (
            f"{per_step} over {world_size} rank(s) is less than {unit_words} per rank"))])
    if not fits(least):
        raise ConfigError("memory plan", [(f"training.{key}", (
            f"auto: not even {unit_words} fits {fmt_bytes(limit).strip()} "
            f"({100 * (1 - t.memory_margin):.0f}% of the device); see `finetune plan` for what would"))])
    lo, hi = least, per_rank  # fits(lo); find the largest that fits
    if fits(hi):
        lo = hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    accum = math.ceil(per_step / (lo * world_size))
    # The fewest micro-batches per step whose size divides the step exactly. A step of examples is
    # kept exactly (the learning rate is tuned for it; one example per micro-batch always divides);
    # a step of tokens only while that costs under a tenth of the budget (a budget is "up to" its
    # tokens anyway), else the budget is rounded down and the message says what a step holds.
    widest = per_step // (least * world_size) if exact_step else min(math.ceil(1.1 * accum), per_step // (least * world_size))
    exact = next((a for a in range(accum, widest + 1) if per_step % (a * world_size) == 0), None)
    accum = exact or accum
    value = max(least, per_step // (accum * world_size))
    where = f"{fmt_bytes(device_memory).strip()}{' (' + memory_note + ')' if memory_note else ''}"
    said = (f"{key} auto: {value} (the largest that fits: {lo}, with {100 * t.memory_margin:.0f}% of {where} spare) "
            f"x grad_accum {accum} x {world_size} rank(s) = {value * accum * world_size} "
            f"{step_key.split('_')[0]} per optimizer step ({step_key} {per_step})")
    return value, accum, said


def trained_counter(ds):
    """For a cache of chat data (a `labels` column): example ids -> their trained tokens (labels != -100
    past the first position, the positions the loss scores). None for other kinds of data."""
    if "labels" not in ds.column_names:
        return None
    column = ds.data.column("labels")

    def trained_of(ids: list[int]) -> int:
        import numpy as np

        rows = column.take(ids).to_pylist() if ids else []
        return sum(int((np.asarray(r[1:]) != -100).sum()) for r in rows)

    return trained_of


def data_batch_inputs(cfg):
    """(lengths, trained_of, mean trained tokens per example) of the training data, from its cache
    (built here when it is missing, as `finetune prepare` builds it; the tokenizer is loaded for that)."""
    from finetune.data.cache import prepared_split
    from finetune.models.loading import load_tokenizer

    tok = load_tokenizer(cfg.model, chat_template=cfg.chat_template, trust_remote_code=cfg.trust_remote_code)
    ds, stats, _ = prepared_split(cfg, tok, cfg.data.train, progress=False)
    return ds.data.column("length").to_numpy(), trained_counter(ds), stats.trained_tokens / max(1, stats.kept)


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="training YAML (configs/train/...); its data files need not exist")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. training.batch_size=2")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=1)
    p.add_argument("--gpu-memory", default="80GiB", help="memory per device (e.g. 80GiB, 24GiB)")
    p.add_argument("--cpu-memory", default=None, help="host memory per node, checked when offloading")
    p.add_argument("--device", choices=["gpu", "cpu"], default="gpu",
                   help="cpu: predict a CPU process's RSS increase (fp32), as scripts/validate_plan.py measures")
    p.add_argument("--data", action="store_true",
                   help="plan from the training data's token lengths (its data cache, built if missing; the "
                        "tokenizer is loaded): the longest micro-batch the run's sampler produces, not max_length rows")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def plan_command(args: argparse.Namespace) -> int:
    """`finetune plan`: print the plan; exit 0 if it fits, 1 if not, 2 on a config problem."""
    from finetune.config import ConfigError

    try:
        if getattr(args, "data", False):
            from finetune.config import load_config

            cfg = load_config(args.config, args.overrides)  # the data must exist to plan from it
        else:
            cfg = load_plan_config(args.config, args.overrides)
        from finetune.training.launch import packing_settings

        # `packing: auto` as a run on this device decides it (packed rows are one long row per micro-batch).
        packing, attn, _ = packing_settings(cfg, args.device)
        cfg = cfg.model_copy(update={"packing": packing, "attn_implementation": attn})
        raw, src = resolve_model_config(cfg.model)
        shape = ModelShape.from_config(raw, src)
        lengths = trained_of = mean = None
        heavy_early = "auto" in (cfg.training.tokens_per_batch, cfg.training.batch_size)
        if getattr(args, "data", False):
            lengths, trained_of, mean = data_batch_inputs(cfg)
        auto = {"tokens_per_batch": resolve_token_budget, "batch_size": resolve_batch_size}
        for key, resolve in auto.items():
            if getattr(cfg.training, key) != "auto":
                continue
            extra = {"longest": int(lengths.max())} if key == "batch_size" and lengths is not None and len(lengths) else {}
            value, accum, said = resolve(
                cfg, world_size=args.nodes * args.gpus_per_node, gpus_per_node=args.gpus_per_node, device=args.device,
                device_memory=parse_size(args.gpu_memory), **extra)
            print(said, file=sys.stderr if args.json else sys.stdout)
            cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={key: value, "grad_accum": accum})})
        s = setup_from_config(cfg, nodes=args.nodes, gpus_per_node=args.gpus_per_node, device=args.device,
                              device_memory=parse_size(args.gpu_memory),
                              host_memory=parse_size(args.cpu_memory) if args.cpu_memory else None)
        batch = None
        if lengths is not None:
            batch = run_longest_batch(cfg, lengths, world_size=args.nodes * args.gpus_per_node, trained_of=trained_of,
                                      mean_trained=mean, heavy_early=heavy_early)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    plan = make_plan(shape, s) if batch is None else plan_from_batch(shape, s, batch)
    print(json.dumps(plan.as_dict(), indent=2) if args.json else render_plan(plan))
    return 0 if plan.fits else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="finetune plan", description=DESCRIPTION)
    add_plan_arguments(p)
    return plan_command(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
