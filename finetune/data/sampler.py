"""The train sampler: batches of similar length in a random order of batches
(`training.group_by_length`), and the mixin that gives a Trainer this sampler."""

from __future__ import annotations

__all__ = ["LengthGroupedShuffledSampler", "LengthGroupedSampling"]


class LengthGroupedShuffledSampler:
    """Batches of similar length, in a random order of batches: little padding, lengths still mixed.

    Per epoch: shuffle all examples; cut them into windows of `window` batches; sort each window
    by length and cut it into batches; then shuffle the batches of the whole epoch together.

    transformers' `LengthGroupedSampler` stops at the per-window sort, so every window runs from
    its longest batch to its shortest and an epoch ends on short examples only. The batch-level
    shuffle removes that within-epoch curriculum (see docs/benchmarks.md for the eval-loss cost of
    the unshuffled version). The order is a function of (seed, epoch), so every data-parallel rank
    computes the same list and a resumed run replays it; accelerate hands consecutive batches to
    different ranks, so ranks in one step get batches of similar length and wait less at the
    gradient all-reduce. The only partial batch (when len % batch_size != 0) comes last, so the
    DataLoader's fixed-size batching stays aligned with ours.
    """

    def __init__(self, lengths, batch_size: int, *, window: int = 64, seed: int = 0):
        import numpy as np

        if batch_size < 1 or window < 1:
            raise ValueError("batch_size and window must be >= 1")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size = batch_size
        self.window = window
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def epoch_arrays(self):
        """This epoch's batches as (full [n, batch_size] array, the partial last batch or None)."""
        import numpy as np
        import torch

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.lengths), generator=g).numpy()
        span = self.window * self.batch_size
        full: list = []
        partial = None
        for start in range(0, len(order), span):
            chunk = order[start:start + span]
            # A stable sort by length: the order `sorted(chunk, key=length)` gives, on arrays.
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            n_full = len(chunk) // self.batch_size
            if n_full:
                full.append(chunk[:n_full * self.batch_size].reshape(n_full, self.batch_size))
            if len(chunk) % self.batch_size:
                partial = chunk[n_full * self.batch_size:]
        full_arr = np.concatenate(full) if full else np.zeros((0, self.batch_size), dtype=np.int64)
        perm = torch.randperm(len(full_arr), generator=g).numpy()
        return full_arr[perm], partial

    def batches(self) -> list[list[int]]:
        full, partial = self.epoch_arrays()
        return full.tolist() + ([partial.tolist()] if partial is not None else [])

    def __iter__(self):
        # One numpy array for the epoch (8 bytes an example), not a Python list per batch.
        full, partial = self.epoch_arrays()
        for batch in full:
            yield from batch.tolist()
        if partial is not None:
            yield from partial.tolist()


class LengthGroupedSampling:
    """The kit's train sampler for a Trainer (subclass this before the Trainer class).

    Training batches come from `LengthGroupedShuffledSampler` when `training.group_by_length`
    (the default): similar lengths within a batch, random order of batches.
    """

    def __init__(self, *args, group_by_length: bool = False, group_window: int = 64, **kwargs):
        self.group_by_length = group_by_length
        self.group_window = group_window
        super().__init__(*args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        ds = train_dataset if train_dataset is not None else self.train_dataset
        if self.group_by_length and ds is not None and "length" in getattr(ds, "column_names", ()):
            # The length column straight from Arrow as one numpy array (no Python list per example).
            lengths = ds.data.column("length").to_numpy()
            return LengthGroupedShuffledSampler(lengths, self._train_batch_size,
                                                window=self.group_window, seed=self.args.seed)
        return super()._get_train_sampler(train_dataset)
