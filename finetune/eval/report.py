"""The evaluation report: base vs tuned model, as report.json, report.md and two PNG charts.

Input is a plain dict ``{"models": {"base": {...}, "tuned": {...}}, "meta": {...}}`` where each
model holds sections ``intrinsic`` / ``extrinsic`` / ``lm_eval`` of numbers; either model may be
absent. matplotlib is imported only when charts are drawn.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kitcore.io import atomic_write_text, atomic_write_via

__all__ = ["compare", "format_table", "higher_is_better", "write_report"]

logger = logging.getLogger(__name__)

SECTIONS = ("intrinsic", "extrinsic", "preference", "rewards", "lm_eval")
_SECTION_TITLES = {"intrinsic": "Intrinsic", "extrinsic": "Extrinsic", "preference": "Preference", "rewards": "Rewards",
                   "lm_eval": "lm-eval"}
_COUNT_KEYS = {"n", "tokens", "bytes", "nll_sum", "kl_to_teacher_sum", "errors"}
_LOWER_IS_BETTER = {"nll", "perplexity", "bits_per_byte", "word_perplexity", "byte_perplexity", "kl_to_teacher"}
# Relative tolerance below which a change is float noise, not a regression.
_REL_TOL = 1e-6
_BAR_INTRINSIC = ("nll", "bits_per_byte", "token_accuracy")
_FLAG = "⚠ regression"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _flatten(section: str, values: Any) -> Iterator[tuple[str, float]]:
    """(metric, value) pairs of one section, without counts, stderrs and non-numbers."""
    if not isinstance(values, dict):
        return
    if section == "lm_eval":
        # {"task": {"acc,none": 0.5, "acc_stderr,none": 0.01, "alias": "task"}} -> "task/acc"
        for task, results in values.items():
            if not isinstance(results, dict):
                continue
            for key, value in results.items():
                if _is_number(value) and "_stderr" not in key:
                    name = key[: -len(",none")] if key.endswith(",none") else key
                    yield f"{task}/{name}", value
        return
    for key, value in values.items():
        if _is_number(value) and key not in _COUNT_KEYS and not key.startswith("n_"):
            yield key, value


def higher_is_better(metric: str) -> bool:
    """False for losses, NLL, perplexities and bits per byte; True otherwise."""
    name = metric.rsplit("/", 1)[-1].split(",", 1)[0]
    return not (name in _LOWER_IS_BETTER or "loss" in name)


def compare(base: dict[str, Any] | None, tuned: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per metric present in both models: section, metric, base, tuned, delta (tuned - base),
    higher_is_better and regression (tuned worse than base beyond float noise)."""
    if not base or not tuned:
        return []
    rows = []
    for section in SECTIONS:
        tuned_values = dict(_flatten(section, tuned.get(section)))
        for metric, b in _flatten(section, base.get(section)):
            if metric not in tuned_values:
                continue
            t = tuned_values[metric]
            higher = higher_is_better(metric)
            worse_by = (b - t) if higher else (t - b)
            regression = worse_by > 0 and not math.isclose(b, t, rel_tol=_REL_TOL, abs_tol=1e-12)
            rows.append(
                {
                    "section": section,
                    "metric": metric,
                    "base": b,
                    "tuned": t,
                    "delta": t - b,
                    "higher_is_better": higher,
                    "regression": regression,
                }
            )
    return rows


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    return f"{value:.1f}" if abs(value) >= 1000 else f"{value:.4f}"


def _fmt_delta(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:+.1f}" if abs(value) >= 1000 else f"{value:+.4f}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """The comparison as a plain-text aligned table for a terminal."""
    if not rows:
        return "(no metric present in both base and tuned)"
    header = ["section", "metric", "base", "tuned", "delta", ""]
    lines = [
        [
            r["section"],
            r["metric"],
            _fmt(r["base"]),
            _fmt(r["tuned"]),
            _fmt_delta(r["delta"]),
            _FLAG if r["regression"] else "",
        ]
        for r in rows
    ]
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(5)]
    out = []
    for row in [header, *lines]:
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [row[i].rjust(widths[i]) for i in (2, 3, 4)]
        out.append("  ".join([*cells, row[5]]).rstrip())
    return "\n".join(out)


def _markdown(report: dict[str, Any], rows: list[dict[str, Any]], charts: dict[str, Path]) -> str:
    models = report.get("models") or {}
    names = [name for name in ("base", "tuned") if models.get(name)]
    both = len(names) == 2
    by_key = {(r["section"], r["metric"]): r for r in rows}
    out = ["# Evaluation report", ""]
    if not names:
        out += ["No model results.", ""]
    n_regressions = sum(r["regression"] for r in rows)
    if both:
        out += [f"{len(rows)} metrics compared; tuned is worse than base on {n_regressions}.", ""]

    for section in SECTIONS:
        per_model = {name: dict(_flatten(section, models[name].get(section))) for name in names}
        metrics = list(dict.fromkeys(m for values in per_model.values() for m in values))
        if not metrics:
            continue
        out += [f"## {_SECTION_TITLES[section]}", ""]
        header = ["metric", *names] + (["Δ", "flag"] if both else [])
        align = ["---", *["---:"] * len(names)] + (["---:", "---"] if both else [])
        out += ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
        for metric in metrics:
            cells = [metric, *(_fmt(per_model[name].get(metric)) for name in names)]
            if both:
                row = by_key.get((section, metric))
                cells += [_fmt_delta(row["delta"]), _FLAG if row["regression"] else ""] if row else ["—", ""]
            out.append("| " + " | ".join(cells) + " |")
        counts = [
            f"{name}: " + ", ".join(f"{k}={v}" for k, v in models[name][section].items() if _is_count(k, v))
            for name in names
            if isinstance(models[name].get(section), dict)
            and any(_is_count(k, v) for k, v in models[name][section].items())
        ]
        if counts:
            out += ["", "Counts — " + "; ".join(counts)]
        out.append("")

    if charts:
        out += ["## Charts", ""]
        titles = {"loss_curve": "Training loss", "metrics_bars": "Metrics by model"}
        out += [f"![{titles[key]}]({path.name})" for key, path in charts.items()]
        out.append("")
    meta = report.get("meta") or {}
    if meta:
        out += ["## Meta", ""]
        for key, value in meta.items():
            text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
            out.append(f"- **{key}**: `{text}`")
        out.append("")
    return "\n".join(out)


def _is_count(key: str, value: Any) -> bool:
    return _is_number(value) and (key in _COUNT_KEYS or key.startswith("n_"))


def _read_loss_points(path: Path) -> dict[str, list[tuple[float, float]]]:
    """Series "loss", "eval_loss", "learning_rate" as (step, value); malformed lines are logged."""
    series: dict[str, list[tuple[float, float]]] = {"loss": [], "eval_loss": [], "learning_rate": []}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                logger.warning("%s:%d: skipped, not JSON (%s)", path, lineno, e.msg)
                continue
            if not isinstance(record, dict) or not _is_number(record.get("step")):
                logger.warning("%s:%d: skipped, not an object with a numeric 'step'", path, lineno)
                continue
            for key, points in series.items():
                if _is_number(record.get(key)) and math.isfinite(record[key]):
                    points.append((record["step"], record[key]))
    return series


def _plot_loss_curve(series: dict[str, list[tuple[float, float]]], path: Path) -> None:
    from matplotlib.figure import Figure

    with_lr = bool(series["learning_rate"])
    fig = Figure(figsize=(8, 6 if with_lr else 4.5), layout="constrained")
    if with_lr:
        ax, ax_lr = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    else:
        ax, ax_lr = fig.subplots(), None
    if series["loss"]:
        ax.plot(*zip(*series["loss"]), label="training loss", color="tab:blue", linewidth=1.2)
    if series["eval_loss"]:
        ax.plot(*zip(*series["eval_loss"]), "o--", label="eval loss", color="tab:orange", markersize=5)
    ax.set_ylabel("loss")
    ax.set_title("Loss by step")
    ax.grid(alpha=0.3)
    ax.legend()
    if ax_lr is not None:
        ax_lr.plot(*zip(*series["learning_rate"]), color="tab:green", linewidth=1.2)
        ax_lr.set_ylabel("learning rate")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax_lr.grid(alpha=0.3)
    (ax_lr or ax).set_xlabel("step")
    atomic_write_via(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def _plot_bars(models: dict[str, Any], path: Path) -> bool:
    """Grouped bars base vs tuned: extrinsic metrics on a 0-1 axis, then nll / bpb / token accuracy."""
    from matplotlib.figure import Figure

    names = [name for name in ("base", "tuned") if models.get(name)]
    values = {
        section: {name: dict(_flatten(section, models[name].get(section))) for name in names}
        for section in ("extrinsic", "intrinsic", "preference")
    }
    extrinsic = [
        m
        for m in dict.fromkeys(m for v in values["extrinsic"].values() for m in v)
        # Only 0-1 metrics share the axis; user metrics on other scales stay in the table.
        if all(0 <= v[m] <= 1 for v in values["extrinsic"].values() if m in v)
    ]
    intrinsic = [m for m in _BAR_INTRINSIC if any(m in v for v in values["intrinsic"].values())]
    panels = [
        (title, section, metrics)
        for title, section, metrics in (
            ("Extrinsic (0-1, higher is better)", "extrinsic", extrinsic),
            ("Intrinsic", "intrinsic", intrinsic),
            ("Preference accuracy (0-1)", "preference",
             [m for m in ("preference_accuracy", "preference_accuracy_per_token", "reward_accuracy",
                          "kto_reward_accuracy")
              if any(m in v for v in values["preference"].values())]),
        )
        if metrics
    ]
    if not panels:
        return False
    widths = [max(len(metrics), 2) for _, _, metrics in panels]
    fig = Figure(figsize=(2.0 + 1.3 * sum(widths), 4.5), layout="constrained")
    axes = fig.subplots(1, len(panels), width_ratios=widths, squeeze=False)[0]
    colors = {"base": "tab:gray", "tuned": "tab:blue"}
    bar_width = 0.8 / len(names)
    for ax, (title, section, metrics) in zip(axes, panels):
        for i, name in enumerate(names):
            xs = [j + (i - (len(names) - 1) / 2) * bar_width for j in range(len(metrics))]
            heights = [values[section][name].get(m, math.nan) for m in metrics]
            bars = ax.bar(xs, heights, bar_width, label=name, color=colors[name])
            ax.bar_label(bars, fmt="%.3g", fontsize=8, padding=2)
        labels = [m if higher_is_better(m) else f"{m}\n(lower is better)" for m in metrics]
        ax.set_xticks(range(len(metrics)), labels, rotation=0, fontsize=9)
        ax.set_title(title)
        ax.margins(y=0.15)
        if section in ("extrinsic", "preference"):
            ax.set_ylim(0, 1.1)
        ax.grid(axis="y", alpha=0.3)
    # One legend above the panels: inside a panel it hides the value labels of the tallest bars.
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside upper center", ncols=len(names))
    atomic_write_via(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    return True


def write_report(
    output_dir: str | Path, report: dict[str, Any], metrics_jsonl: str | Path | None = None
) -> dict[str, Path]:
    """Write report.json, report.md, metrics_bars.png and (given a run's metrics.jsonl with a loss)
    loss_curve.png into ``output_dir``, each atomically. Returns {"json", "markdown", ...: path}."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    models = report.get("models") or {}
    rows = compare(models.get("base"), models.get("tuned"))
    written: dict[str, Path] = {}

    charts: dict[str, Path] = {}
    if metrics_jsonl is not None:
        metrics_jsonl = Path(metrics_jsonl)
        if not metrics_jsonl.is_file():
            logger.warning("%s: not found, no loss curve drawn", metrics_jsonl)
        else:
            series = _read_loss_points(metrics_jsonl)
            if series["loss"] or series["eval_loss"]:
                _plot_loss_curve(series, output_dir / "loss_curve.png")
                charts["loss_curve"] = output_dir / "loss_curve.png"
            else:
                logger.warning("%s: no 'loss' or 'eval_loss' values, no loss curve drawn", metrics_jsonl)
    if _plot_bars(models, output_dir / "metrics_bars.png"):
        charts["metrics_bars"] = output_dir / "metrics_bars.png"

    full = {**report, "comparison": rows}
    text = json.dumps(full, indent=2, ensure_ascii=False, default=str) + "\n"
    written["json"] = output_dir / "report.json"
    atomic_write_text(written["json"], text)
    markdown = _markdown(report, rows, charts)
    written["markdown"] = output_dir / "report.md"
    atomic_write_text(written["markdown"], markdown)
    return {**written, **charts}
