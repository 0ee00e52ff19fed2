"""lm-evaluation-harness tasks on the base model and on base + adapter, fully offline.

lm-eval is an optional dependency (`pip install "finetune-kit[lm-eval]"`); it is imported here only.
Local-file tasks (`dataset_path: json`, `dataset_kwargs: {data_files: ...}`) in `include_dir` run
without a network, which is how the tests use it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["run_lm_eval"]


def run_lm_eval(base_model: str, adapter: str | None, tasks: list[str], include_dir: str | None = None,
                *, batch_size: int = 8, limit: int | None = None) -> dict[str, dict[str, Any]]:
    """{"base": {task: {metric: value}}, "tuned": {...}} (tuned only when an adapter is given)."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise RuntimeError('lm-eval tasks need lm-eval: pip install "finetune-kit[lm-eval]"') from exc
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "bfloat16" if device == "cuda" else "float32"
    tm = TaskManager(include_path=include_dir) if include_dir else TaskManager()
    out: dict[str, dict[str, Any]] = {}
    variants = [("base", f"pretrained={base_model},dtype={dtype}")]
    if adapter:
        variants.append(("tuned", f"pretrained={base_model},peft={adapter},dtype={dtype}"))
    for label, model_args in variants:
        logger.info("lm-eval %s on %s", ",".join(tasks), label)
        res = lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=tasks, task_manager=tm,
                                      device=device, batch_size=batch_size, limit=limit,
                                      log_samples=False)
        if res is None:  # non-zero ranks get None under distributed runs
            continue
        out[label] = {t: {k: v for k, v in r.items() if isinstance(v, (int, float))}
                      for t, r in res["results"].items()}
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    return out
