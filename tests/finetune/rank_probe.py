"""The distributed tests' probe: `finetune train` with a callback that records, on every rank, what
that rank saw. Launched in place of `-m finetune`:

    accelerate launch --config_file ... --num_processes 2 tests/finetune/rank_probe.py train CONFIG ...

Each rank writes rank_probe/rank-N.json in the run dir: pid, rank and world size as the process
group sees them, a short hash per example of its first batches (ranks must see different data)
and, after training, the sum and local size of its trainable weights (DDP and ZeRO-1/2 ranks must
agree; ZeRO-3 ranks hold shards) and the model's module classes (e.g. Linear4bit for QLoRA).
FINETUNE_RANK_PROBE_EXIT=R:S makes rank R die (os._exit) after step S, to check that a dead rank
fails the job instead of hanging it. The batch hashes come from wrapping the collator the trainer
is built with (a test-only patch of finetune.training.recipe.make_collator).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from finetune.console import atomic_write_text


class RankProbe(TrainerCallback):
    """Records what this rank saw (see the module docstring); `attach` gives it the run's collator."""

    BATCHES = 4

    def __init__(self):
        self.out_dir: Path | None = None
        self._collate = None
        self.info: dict[str, Any] = {"pid": os.getpid(), "batches": []}
        exit_at = os.environ.get("FINETUNE_RANK_PROBE_EXIT", "")
        self.exit_at = tuple(int(x) for x in exit_at.split(":")) if exit_at else None

    def attach(self, out_dir: Path, collate) -> None:
        self.out_dir, self._collate = out_dir, collate

    def collate(self, rows: list[dict]) -> dict[str, Any]:
        if len(self.info["batches"]) < self.BATCHES:
            self.info["batches"].append(
                [hashlib.sha1(str(self._identity(r)).encode()).hexdigest()[:12] for r in rows])
        return self._collate(rows)

    @staticmethod
    def _identity(row: dict) -> Any:
        """What identifies a row: its tokens (SFT), its prompt and chosen reply (pairs), its prompt and
        completion (KTO's unpaired examples)."""
        if "input_ids" in row:
            return row["input_ids"]
        return row["prompt_ids"], row.get("chosen_ids", row.get("completion_ids"))

    def _write(self, args) -> None:
        atomic_write_text(self.out_dir / f"rank-{args.process_index}.json", json.dumps(self.info))

    def on_train_begin(self, args, state, control, **kw):
        import torch.distributed as dist

        ready = dist.is_available() and dist.is_initialized()
        self.info.update(rank=dist.get_rank() if ready else 0, world_size=dist.get_world_size() if ready else 1)
        self._write(args)

    def on_step_end(self, args, state, control, **kw):
        self._write(args)
        if self.exit_at == (args.process_index, state.global_step):
            os._exit(1)

    def on_train_end(self, args, state, control, model=None, **kw):
        if model is not None:
            trainable = [p for p in model.parameters() if p.requires_grad]
            self.info.update(
                trainable_sum=sum(float(p.detach().double().sum()) for p in trainable),
                trainable_numel=sum(p.numel() for p in trainable),  # 0 for ZeRO-3 partitioned params
                module_types=sorted({type(m).__name__ for m in model.modules()}),
            )
        self._write(args)


def main(argv: list[str]) -> int:
    import finetune.training.recipe as T
    from finetune.cli import main as cli_main

    probe = RankProbe()
    make_collator, train = T.make_collator, T.train

    def probing_collator(cfg, tokenizer):
        probe.attach(Path(cfg.output_dir) / "rank_probe", make_collator(cfg, tokenizer))
        return probe.collate

    T.make_collator = probing_collator
    T.train = lambda cfg, callbacks=(): train(cfg, callbacks=[*callbacks, probe])
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
