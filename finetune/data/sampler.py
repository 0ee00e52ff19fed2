"""The train sampler: batches of similar length in a random order of batches
(`training.group_by_length`), and the mixin that gives a Trainer this sampler."""

from __future__ import annotations

__all__ = ["LengthGroupedShuffledSampler", "TokenBudgetBatchSampler", "LengthGroupedSampling", "heavy_batches_at"]


def heavy_batches_at(weights: list, count: int, position: int) -> list[int]:
    """An order of the batches 0..n-1: the `count` heaviest (by `weights`, the first on ties) moved,
    in their own order, to `position` (clamped so that they fit), the others in theirs.

    The samplers make the heaviest micro-batches the second optimizer step (count = position = the
    micro-batches of one step, grad_accum x ranks, so every rank gets its heaviest there): the first
    step creates the optimizer's states (AdamW's m and v, twice the trainable weights), so the second
    is the first that holds all the step's peak holds. A micro-batch that does not fit then fails in
    the run's first two steps, not late in an epoch, and `auto` can retry it smaller. The order
    depends on grad_accum x ranks only, so a run resumed with fewer ranks and more accumulation (the
    same step) replays the same batches."""
    n = len(weights)
    count = min(max(0, count), n)
    if count == 0:
        return list(range(n))
    heavy = sorted(sorted(range(n), key=lambda i: weights[i], reverse=True)[:count])
    chosen = set(heavy)
    rest = [i for i in range(n) if i not in chosen]
    at = max(0, min(position, n - count))
    return rest[:at] + heavy + rest[at:]


class LengthGroupedShuffledSampler:
    """Batches of similar length, in a random order of batches: little padding, lengths still mixed.

    Per epoch: shuffle all examples; cut them into windows of `window` batches; sort each window
    by length and cut it into batches; then shuffle the batches of the whole epoch together, and
    make the heaviest the second optimizer step (heavy_batches_at).

    transformers' `LengthGroupedSampler` stops at the per-window sort, so every window runs from
    its longest batch to its shortest and an epoch ends on short examples only. The batch-level
    shuffle removes that within-epoch curriculum (see docs/benchmarks.md for the eval-loss cost of
    the unshuffled version). The order is a function of (seed, epoch), so every data-parallel rank
    computes the same list and a resumed run replays it; accelerate hands consecutive batches to
    different ranks, so ranks in one step get batches of similar length and wait less at the
    gradient all-reduce. The only partial batch (when len % batch_size != 0) comes last, so the
    DataLoader's fixed-size batching stays aligned with ours.
    """

    def __init__(self, lengths, batch_size: int, *, window: int = 64, seed: int = 0, step_batches: int = 0):
        import numpy as np

        if batch_size < 1 or window < 1:
            raise ValueError("batch_size and window must be >= 1")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size = batch_size
        self.window = window
        self.seed = seed
        self.step_batches = max(0, int(step_batches))
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
        full_arr = full_arr[perm]
        if self.step_batches and len(full_arr) > 1:
            # The heaviest batches (the longest example, then the most tokens) as the second optimizer
            # step (heavy_batches_at says why).
            sizes = self.lengths[full_arr]
            weights = list(zip(sizes.max(axis=1).tolist(), sizes.sum(axis=1).tolist()))
            full_arr = full_arr[heavy_batches_at(weights, self.step_batches, self.step_batches)]
        return full_arr, partial

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


class TokenBudgetBatchSampler:
    """Micro-batches of up to `budget` tokens (`training.tokens_per_batch`), not of a fixed number of
    examples: short examples go many to a batch, long ones few, so every step carries about the same
    tokens.

    A batch's tokens are what its collator builds: rows x its longest example when padded, the sum
    of its examples when packed (`packing: true`). The batches are made once, from the examples
    sorted by length (ties in a seeded random order), by filling each batch until the next example
    would pass the budget; every epoch then shuffles their order (a function of seed and epoch).
    So every example is in exactly one batch per epoch, the number of batches is the same in every
    epoch (the Trainer's step count and a resume's position stay exact), a resumed run replays the
    same order, and batches hold examples of similar length (little padding). An example longer than
    the budget is a batch alone. With `num_replicas` ranks, the largest batches are split until the
    count divides evenly, so no rank repeats an example to fill its last step.
    """

    def __init__(self, lengths, budget: int, *, seed: int = 0, packing: bool = False, num_replicas: int = 1,
                 max_rows: int | None = None, step_batches: int = 0):
        import numpy as np

        if budget < 1:
            raise ValueError("the token budget must be >= 1")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.budget, self.seed, self.packing = int(budget), int(seed), bool(packing)
        self.max_rows = max_rows
        self.epoch = 0
        self.sampler = self  # accelerate reaches a batch sampler's epoch through `.sampler.set_epoch`
        self.replicas = max(1, int(num_replicas))
        self.step_batches = max(0, int(step_batches))
        self._batches = self._make_batches(self.replicas)

    def _make_batches(self, replicas: int) -> list:
        import numpy as np

        n = len(self.lengths)
        rng = np.random.default_rng(self.seed)
        order = np.lexsort((rng.permutation(n), self.lengths))  # by length; equal lengths in a seeded order
        batches, start = [], 0
        while start < n:
            end, longest, total = start, 0, 0
            while end < n:
                length = int(self.lengths[order[end]])
                rows = end - start + 1
                size = total + length if self.packing else rows * max(longest, length)
                if end > start and (size > self.budget or (self.max_rows and rows > self.max_rows)):
                    break
                longest, total, end = max(longest, length), total + length, end + 1
            batches.append(order[start:end])
            start = end
        while len(batches) % replicas:  # split the batch of most rows (halves always fit the budget)
            i = max(range(len(batches)), key=lambda k: len(batches[k]))
            if len(batches[i]) < 2:
                break  # fewer examples than ranks x 1: accelerate pads as it does for any batch sampler
            b = batches.pop(i)
            batches[i:i] = [b[: len(b) // 2], b[len(b) // 2:]]
        return batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self._batches)

    def batch_tokens(self, batch) -> int:
        sizes = self.lengths[batch]
        return int(sizes.sum()) if self.packing else int(len(sizes) * sizes.max())

    def epoch_batches(self) -> list:
        """This epoch's batches (arrays of example indices), in this epoch's order: shuffled, then the
        heaviest (most tokens, then the longest example) made the second optimizer step, whose
        `step_batches` micro-batches (grad_accum x ranks) they fill (heavy_batches_at says why)."""
        import torch

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(len(self._batches), generator=g).tolist()
        batches = [self._batches[i] for i in perm]
        if not self.step_batches:
            return batches
        weights = [(self.batch_tokens(b), int(self.lengths[b].max())) for b in batches]
        return [batches[i] for i in heavy_batches_at(weights, self.step_batches, self.step_batches)]

    def __iter__(self):
        for batch in self.epoch_batches():
            yield batch.tolist()


class LengthGroupedSampling:
    """The kit's train sampler for a Trainer (subclass this before the Trainer class).

    Training batches come from `LengthGroupedShuffledSampler` when `training.group_by_length`
    (the default): similar lengths within a batch, random order of batches; with
    `training.tokens_per_batch`, from `TokenBudgetBatchSampler` (batches of up to that many tokens).
    """

    def __init__(self, *args, group_by_length: bool = False, group_window: int = 64,
                 tokens_per_batch: int | None = None, packing: bool = False, heavy_early: bool = False, **kwargs):
        self.heavy_early = heavy_early
        self.group_by_length = group_by_length
        self.group_window = group_window
        self.tokens_per_batch = tokens_per_batch
        self.packing = packing
        super().__init__(*args, **kwargs)

    def step_batches(self) -> int:
        """With `heavy_early` (a run whose micro-batch `auto` decided, which can retry it smaller): the
        micro-batches per optimizer step over all ranks, the heaviest that many becoming the second
        step; else 0, the shuffled order untouched (moving batches changes what a run learns: a DPO
        test's held-out accuracy moved by up to 13 points with it, so only the runs that can retry pay)."""
        return self.args.gradient_accumulation_steps * self.args.world_size if self.heavy_early else 0

    def token_budget_sampler(self, train_dataset=None) -> TokenBudgetBatchSampler:
        ds = train_dataset if train_dataset is not None else self.train_dataset
        return TokenBudgetBatchSampler(ds.data.column("length").to_numpy(), self.tokens_per_batch,
                                       seed=self.args.seed, packing=self.packing, num_replicas=self.args.world_size,
                                       step_batches=self.step_batches())

    def get_train_dataloader(self):
        if not self.tokens_per_batch:
            return super().get_train_dataloader()
        # A batch sampler: the DataLoader takes its batches as they are (batch_size is not used).
        from torch.utils.data import DataLoader

        dl = DataLoader(self.train_dataset, batch_sampler=self.token_budget_sampler(), collate_fn=self.data_collator,
                        num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory)
        # accelerate shards the batches over the ranks (each rank every world_size-th batch).
        return self.accelerator.prepare(dl)

    def _get_train_sampler(self, train_dataset=None):
        ds = train_dataset if train_dataset is not None else self.train_dataset
        if self.group_by_length and ds is not None and "length" in getattr(ds, "column_names", ()):
            # The length column straight from Arrow as one numpy array (no Python list per example).
            lengths = ds.data.column("length").to_numpy()
            return LengthGroupedShuffledSampler(lengths, self._train_batch_size, window=self.group_window,
                                                seed=self.args.seed, step_batches=self.step_batches())
        return super()._get_train_sampler(train_dataset)
