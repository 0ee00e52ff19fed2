"""lm-evaluation-harness tasks on the base model and on base + adapter, fully offline.

lm-eval is an optional dependency (`pip install "finetune-kit[lm-eval]"`); it is imported here only.
Local-file tasks (`dataset_path: json`, `dataset_kwargs: {data_files: ...}`) in `include_dir` run
without a network, which is how the tests use it.

Generation stops where lm-eval puts it: at the task's `until` strings plus the tokenizer's EOS.
For a ChatML model whose EOS is not the end-of-turn token, list `<|im_end|>` in the task's
`until` (a warning says so).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["run_lm_eval"]


def _offline_unless_told() -> None:
    """Nothing may be fetched: `datasets` and the hub read these once, at import, so set them first.

    An explicit value in the environment (e.g. HF_HUB_OFFLINE=0 on a machine with a network) wins.
    """
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(var, "1")


def _warn_if_eos_is_not_end_of_turn(tokenizer_dir: str) -> None:
    from finetune.data.chat_template import end_of_turn_token
    from finetune.models.loading import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    eot = end_of_turn_token(tok)
    if eot and eot != tok.eos_token:
        logger.warning("lm-eval stops generation at EOS %r, not at the end-of-turn token %r: list %r in "
                       "each generate_until task's `until`", tok.eos_token, eot, eot)


def run_lm_eval(base_model: str, adapter: str | None, tasks: list[str], include_dir: str | None = None,
                *, batch_size: int = 8, limit: int | None = None) -> dict[str, dict[str, Any]]:
    """{"base": {task: {metric: value}}, "tuned": {...}} (tuned only when an adapter is given).

    The tuned run reads the tokenizer saved with the adapter (the one training used).
    """
    _offline_unless_told()
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise RuntimeError('lm-eval tasks need lm-eval: pip install "finetune-kit[lm-eval]"') from exc
    import torch

    from finetune.models.loading import model_ref

    base_model = model_ref(base_model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "bfloat16" if device == "cuda" else "float32"
    tm = TaskManager(include_path=str(Path(include_dir).resolve())) if include_dir else TaskManager()
    variants = [("base", f"pretrained={base_model},dtype={dtype}", base_model)]
    if adapter:
        adapter = str(Path(adapter).resolve())
        variants.append(("tuned", f"pretrained={base_model},peft={adapter},tokenizer={adapter},dtype={dtype}",
                         adapter))
    out: dict[str, dict[str, Any]] = {}
    for label, model_args, tokenizer_dir in variants:
        if "," in tokenizer_dir:
            raise ValueError(f"lm-eval cannot take a path with a comma in it: {tokenizer_dir}")
        _warn_if_eos_is_not_end_of_turn(tokenizer_dir)
        logger.info("lm-eval %s on %s", ",".join(tasks), label)
        res = lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=tasks, task_manager=tm,
                                      device=device, batch_size=batch_size, limit=limit,
                                      log_samples=False)
        if res is None:  # non-zero ranks get None under distributed runs
            continue
        out[label] = {t: {k: v for k, v in r.items() if isinstance(v, (int, float))}
                      for t, r in res["results"].items()}
    return out
