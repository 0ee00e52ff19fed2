"""`finetune prepare CONFIG.yaml [key=value ...]`: tokenize the training data into its cache ahead
of the launch (the equivalent of `axolotl preprocess`), e.g. on a CPU node with many cores, so that
`finetune train` on the GPU nodes starts without tokenizing. See finetune.data.cache."""

from __future__ import annotations

import time

from finetune.config import TrainConfig
from finetune.console import rank0_print

__all__ = ["prepare"]


def prepare(cfg: TrainConfig, *, num_proc: int | None = None) -> dict[str, dict]:
    """Build (or find) the cache of every split; print and return each split's statistics."""
    from finetune.data.cache import default_num_proc, prepared_split
    from finetune.models.loading import load_tokenizer

    tok = load_tokenizer(cfg.model, chat_template=cfg.chat_template, trust_remote_code=cfg.trust_remote_code)
    workers = num_proc or cfg.data.num_proc or default_num_proc()
    out = {}
    for split, path in (("train", cfg.data.train), ("eval", cfg.data.eval)):
        if not path:
            continue
        t0 = time.perf_counter()
        ds, st, final = prepared_split(cfg, tok, path, num_proc=workers, progress=True)
        out[split] = {**st.as_dict(), "cache": str(final), "seconds": round(time.perf_counter() - t0, 2)}
        rank0_print(f"{split}: {st.examples} examples, {st.kept} kept, {st.tokens} tokens, "
                    f"{st.trained_tokens} trained, {st.truncated} truncated, dropped {dict(st.dropped) or 0}, "
                    f"longest {st.max_tokens} tokens ({out[split]['seconds']:.1f} s)\n  cache: {final}")
    return out
