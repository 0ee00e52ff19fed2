"""Results of a study: trials.csv and trials.md (one row per trial, with its state and error),
best_config.yaml (the best trial as a training config that loads), and Optuna's plots as PNG."""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

from finetune.config import dump_config, load_config
from finetune.console import atomic_write_text
from finetune.sweep.config import SweepConfig
from finetune.sweep.trial import params_to_keys, trial_config

logger = logging.getLogger(__name__)


def trial_rows(study) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        status = t.state.name.lower()
        if t.state.name == "FAIL" and "error" not in a:
            status = "fail (worker died)" if "retry_of" not in a else "fail"
        rows.append({
            "number": t.number,
            "state": status,
            # Optuna gives a pruned trial its last reported value; only complete trials have an objective.
            "objective": t.value if t.state.name == "COMPLETE" else "",
            "best_eval_loss": a.get("best_eval_loss", ""),
            "duration_s": a.get("duration_s", ""),
            "pruned_at_step": a.get("pruned_at_step", ""),
            "pruned_at": a.get("pruned_at", ""),
            "baseline": bool(a.get("baseline")),
            "error": a.get("error", ""),
            **{f"params.{k}": v for k, v in t.params.items()},
        })
    return rows


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_reports(study, sweep: SweepConfig, out: str | Path | None = None) -> dict[str, Path]:
    """trials.csv/.md, best_config.yaml (checked with load_config) and PNG plots in `out`."""
    out = Path(out or sweep.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = trial_rows(study)
    cols = ["number", "state", "objective", "best_eval_loss", "duration_s", "pruned_at_step", "pruned_at",
            "baseline", *[f"params.{k}" for k in sweep.search_space], "error"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    paths = {"csv": atomic_write_text(out / "trials.csv", buf.getvalue())}

    from optuna.trial import TrialState

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    best = study.best_trial if complete else None
    baseline = next((t for t in complete if t.user_attrs.get("baseline")), None)
    md = [f"# Sweep {sweep.study_name}", "",
          f"objective: {sweep.objective} ({sweep.resolved_direction}), sampler {sweep.sampler}, pruner "
          f"{sweep.pruner}; {len(rows)} trials: "
          + ", ".join(f"{n} {s}" for s, n in sorted(count_states(rows).items())), ""]
    if best is not None:
        md.append(f"best: trial {best.number}, {sweep.objective} = {best.value:.5g}"
                  + (f"; baseline (base config's values, trial {baseline.number}) = {baseline.value:.5g}"
                     if baseline is not None else ""))
        md.append("")
    shown = [c for c in cols if c != "error"]
    md.append("| " + " | ".join(c.removeprefix("params.") for c in shown) + " |")
    md.append("|" + "---|" * len(shown))
    for r in rows:
        md.append("| " + " | ".join(_fmt(r.get(c, "")) for c in shown) + " |")
    errors = [r for r in rows if r["error"]]
    if errors:
        md += ["", "## Failed trials", ""] + [f"- trial {r['number']}: {r['error']}" for r in errors]
    paths["md"] = atomic_write_text(out / "trials.md", "\n".join(md) + "\n")

    if best is not None:
        paths["best_config"] = _write_best_config(sweep, best, out)
    paths.update(_write_plots(study, out, n_complete=len(complete)))
    return paths


def count_states(rows: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    return counts


def _write_best_config(sweep: SweepConfig, best, out: Path) -> Path:
    fresh = out / "best_run"
    n = 2
    while fresh.exists():
        fresh, n = out / f"best_run-{n}", n + 1
    cfg = trial_config(sweep, params_to_keys(sweep, best.params), fresh.resolve())
    header = (f"# Best trial {best.number} of sweep {sweep.study_name}: {sweep.objective} = {best.value:.5g}\n"
              f"#   finetune train {out / 'best_config.yaml'}\n"
              f"# params: {json.dumps(best.params, default=str)}\n")
    path = atomic_write_text(out / "best_config.yaml", header + dump_config(cfg))
    load_config(path)  # a best config that does not load is a bug here, not the user's problem
    return path


def _write_plots(study, out: Path, n_complete: int) -> dict[str, Path]:
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    plots = {"optimization_history": ovm.plot_optimization_history,
             "intermediate_values": ovm.plot_intermediate_values}
    if n_complete >= 2:
        plots["param_importances"] = ovm.plot_param_importances
    else:
        logger.info("param_importances.png needs 2 completed trials (%d so far); skipped", n_complete)
    paths = {}
    for name, fn in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = fn(study)
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            fig.tight_layout()
            fig.savefig(out / f"{name}.png", dpi=110)
            plt.close(fig)
            paths[name] = out / f"{name}.png"
        except Exception as exc:  # a plot must never cost the results
            logger.warning("could not draw %s: %s: %s", name, type(exc).__name__, exc)
    return paths
