"""The search: a sweep's grid, and the Optuna sampler and pruner its YAML names (checked by
building them, when the sweep config loads)."""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from finetune.sweep.config import SweepConfig

__all__ = ["choice_label", "grid_size", "make_sampler", "make_pruner"]


def choice_label(choice: Any) -> Any:
    """Optuna stores categorical values as str/int/float/bool/None; dicts and lists get a JSON label."""
    if choice is None or isinstance(choice, (str, int, float, bool)):
        return choice
    if isinstance(choice, dict) and isinstance(choice.get("name"), str):
        return choice["name"]
    return json.dumps(choice, sort_keys=True)


def _grid(sweep: SweepConfig) -> dict[str, list[Any]]:
    grid: dict[str, list[Any]] = {}
    for key, spec in sweep.search_space.items():
        if spec.type == "categorical":
            grid[key] = [choice_label(c) for c in spec.choices or []]
        else:
            assert spec.low is not None and spec.high is not None
            step = spec.step or 1
            n = int(math.floor((spec.high - spec.low) / step + 1e-9)) + 1
            values = [spec.low + i * step for i in range(n)]
            grid[key] = [int(v) for v in values] if spec.type == "int" else values
    return grid


def grid_size(sweep: SweepConfig) -> int:
    return math.prod(len(v) for v in _grid(sweep).values())


def make_sampler(sweep: SweepConfig, check_only: bool = False, n_existing: int = 0):
    """The sampler for the next trial. Its seed is `seed` + the number of trials already in the
    study: a resumed run, or a second worker, must not replay the first one's random draws (with
    one fixed seed, every worker's first sampled trial has the same params)."""
    import optuna

    kw = dict(sweep.sampler_options)
    # Not for the grid: its seed shuffles the grid, and grid ids stored in trials index that order.
    kw["seed"] = kw.get("seed", sweep.seed) + (0 if sweep.sampler == "grid" else n_existing)
    classes = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
               "cmaes": optuna.samplers.CmaEsSampler, "nsga2": optuna.samplers.NSGAIISampler}
    if sweep.sampler == "grid":
        # Optuna's own: trials run inside `study.optimize` (finetune.sweep.worker), where the
        # `study.stop()` it calls after the last grid point is allowed.
        return optuna.samplers.GridSampler(_grid(sweep), **kw)
    if sweep.sampler == "cmaes":
        try:
            import cmaes  # noqa: F401  (Optuna's CMA-ES sampler needs it; imported lazily there)
        except ImportError:
            raise ValueError("sampler: cmaes needs the cmaes package: pip install cmaes") from None
    return classes[sweep.sampler](**kw)


def make_pruner(sweep: SweepConfig, check_only: bool = False):
    import optuna

    kw = dict(sweep.pruner_options)
    if sweep.pruner == "none":
        if kw:
            raise ValueError("pruner: none takes no options")
        return optuna.pruners.NopPruner()
    classes = {"median": optuna.pruners.MedianPruner, "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
               "hyperband": optuna.pruners.HyperbandPruner}
    return classes[sweep.pruner](**kw)
