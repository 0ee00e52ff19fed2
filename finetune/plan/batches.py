"""The micro-batch that sets a run's memory peak, from the data: the token lengths the data cache
stored (after truncation and drops, as training reads them) put through the run's own sampler.

Activations grow with the tokens of one micro-batch, and a padded micro-batch holds rows x its
longest row. The plan without data assumes every row is `max_length` tokens; real data is shorter
(the GPU run of docs/plan.md: the longest batch was 8 x 1,284 tokens, not 8 x 2,048), and the plan
overshot by half. Here:

  padded batches, length-grouped (the default): the sampler's own batches are replayed for every
      epoch (LengthGroupedShuffledSampler, same seed), and the one with the most padded tokens wins;
  padded batches, random order: the batch holding the longest example pads every row to that
      length, so the peak is `batch_size x longest` whatever the order (exact unless that example
      falls in a partial last batch; then it is an upper bound);
  packed rows (`packing: true`): one row per micro-batch, as long as its examples together;
      length-grouped: replayed as above; random order: the `batch_size` longest examples together,
      an upper bound;
  generated completions (GRPO): TRL's RepeatSampler is replayed (rollout_generations), and the
      generation with the longest prompt sets the width of every micro-batch cut from it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LongestBatch", "longest_batch", "longest_budget_batch", "longest_rollout_batch", "rollout_generations",
           "with_trained_tokens"]


@dataclass(frozen=True)
class LongestBatch:
    rows: int  # sequences in the micro-batch as the collator builds it (packed: 1)
    row_tokens: int  # tokens per row, padding included (packed: the row's length)
    examples: int  # examples in it
    longest_example: int  # the longest example of the data, in tokens
    epoch: int  # where it is: epoch and micro-batch index in that epoch (-1: not simulated)
    index: int
    exact: bool  # replayed from the run's sampler (False: an upper bound, the order was not simulated)
    packed: bool
    n_examples: int  # examples in the data
    ids: tuple[int, ...] = ()  # the examples in it (random order, padded: only the longest one is known)
    trained_tokens: int | None = None  # its trained tokens (labels != -100), when the caller counted them

    @property
    def tokens(self) -> int:
        return self.rows * self.row_tokens

    def describe(self) -> str:
        shape = (f"1 packed row of {self.row_tokens:,} tokens ({self.examples} examples)" if self.packed
                 else f"{self.rows} x {self.row_tokens:,} tokens")
        where = (f"epoch {self.epoch}, micro-batch {self.index}" if self.exact and self.index >= 0
                 else "the batch holding the longest example" if not self.packed else "an upper bound")
        trained = f", {self.trained_tokens:,} trained" if self.trained_tokens else ""
        return (f"{shape}{trained} ({where}; longest example {self.longest_example:,} tokens, "
                f"{self.n_examples:,} examples)")


def longest_batch(lengths, batch_size: int, *, group_by_length: bool = True, window: int = 64, seed: int = 0,
                  packing: bool = False, epochs: int = 1, micro_batches: int | None = None,
                  step_batches: int = 0) -> LongestBatch:
    """The micro-batch with the most tokens (padding included) that training will run, from the
    examples' token lengths (the data cache's `length` column, in dataset order). `micro_batches`:
    how many the run consumes in all, over all ranks (max_steps x grad_accum x world size), when it
    stops before the end of its epochs; None: every batch of `epochs` epochs."""
    import numpy as np

    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    if n == 0:
        raise ValueError("no examples: the data holds nothing to train on")
    b = max(1, int(batch_size))
    longest = int(lengths.max())
    if not group_by_length:
        # The order is the Trainer's random sampler's; not replayed, so every batch of the data counts.
        if packing:
            top = np.argsort(lengths, kind="stable")[-b:]
            return LongestBatch(1, int(lengths[top].sum()), len(top), longest, -1, -1, False, True, n,
                                ids=tuple(int(i) for i in top))
        # The longest example's batch pads every row to its length; only a partial last batch is smaller.
        return LongestBatch(min(b, n), longest, min(b, n), longest, -1, -1, n % b == 0 or n < b, False, n,
                            ids=(int(np.argmax(lengths)),))
    from finetune.data.sampler import LengthGroupedShuffledSampler

    sampler = LengthGroupedShuffledSampler(lengths, b, window=window, seed=seed, step_batches=step_batches)
    best: tuple | None = None  # (tokens, rows, row_tokens, epoch, index, example ids)
    left = micro_batches
    for epoch in range(max(1, int(epochs))):
        if left is not None and left <= 0:
            break
        sampler.set_epoch(epoch)
        full, partial = sampler.epoch_arrays()
        sizes = lengths[full] if len(full) else np.zeros((0, b), dtype=np.int64)
        rows = np.full(len(full), b)
        per_row = sizes.sum(axis=1) if packing else sizes.max(axis=1, initial=0)
        if partial is not None:
            p = lengths[partial]
            per_row = np.append(per_row, p.sum() if packing else p.max())
            rows = np.append(rows, len(partial))
        tokens = per_row if packing else per_row * rows
        if left is not None:
            tokens = tokens[:left]
            left -= len(tokens)
        i = int(np.argmax(tokens))
        members = full[i] if i < len(full) else partial
        cand = (int(tokens[i]), int(rows[i]), int(per_row[i]), epoch, i, tuple(int(x) for x in members))
        if best is None or cand[0] > best[0]:
            best = cand
    tokens, rows, per_row, epoch, index, ids = best
    return LongestBatch(1 if packing else rows, per_row, rows, longest, epoch, index, True, packing, n, ids=ids)


def _generation_epochs(n_prompts: int, *, batch_size: int, grad_accum: int, world_size: int, group: int,
                       iterations: int, seed: int, epochs: int, micro_batches: int | None):
    """(epoch, passes, prompt ids [generations, world_size, batch_size x grad_accum]) per epoch, the
    generations the run reaches (rollout_generations)."""
    import itertools

    import numpy as np
    from trl.trainer.utils import RepeatSampler

    per_rank = batch_size * grad_accum
    per_gen = per_rank * world_size
    if per_gen % group:
        raise ValueError(f"{per_gen} rows per generation is not a multiple of {group} completions per prompt")
    passes = grad_accum * iterations
    # TRL's sampler draws one permutation per epoch whatever its repeat counts, so drawn without them
    # it gives the run's prompts in the run's order, a generation's prompts per chunk, each once; the
    # repeats (a prompt's completions side by side, the chunk once per micro-batch it serves) are laid
    # out here as TRL lays them out.
    sampler = RepeatSampler(range(n_prompts), mini_repeat_count=1, batch_size=per_gen // group, shuffle=True,
                            seed=seed)
    left = micro_batches
    for epoch in itertools.count():
        if (left is not None and left <= 0) or (left is None and epoch >= max(1, int(epochs))):
            return
        order = np.fromiter(iter(sampler), dtype=np.int64)
        if not len(order):
            raise ValueError(f"{n_prompts} prompts: fewer than one generation draws ({per_gen // group})")
        gens = np.repeat(order, group).reshape(-1, world_size, per_rank)
        if left is not None:
            gens = gens[: -(-left // passes)]
            left -= len(gens) * passes
        yield epoch, passes, gens


def rollout_generations(n_prompts: int, *, batch_size: int, grad_accum: int = 1, world_size: int = 1,
                        group: int = 1, iterations: int = 1, seed: int = 0, epochs: int = 1,
                        micro_batches: int | None = None):
    """The generation batches of a method that generates its completions while training (GRPO), in the
    order TRL's RepeatSampler draws them for the run's seed (TRL's own sampler, replayed): yields
    (epoch, first micro-batch index in the epoch, prompt ids [world_size, batch_size x grad_accum]).

    One generation serves grad_accum x `iterations` micro-batches on every rank (TRL's
    steps_per_generation is grad_accum): batch_size x grad_accum x world_size rows, `group` completions
    of each of its prompts; rank r generates the r-th slice (the dataloader deals the sampler's batches
    to the ranks in turn). `micro_batches`: how many each rank runs in all (max_steps x grad_accum), or
    None: every generation of `epochs` epochs."""
    for epoch, passes, gens in _generation_epochs(n_prompts, batch_size=batch_size, grad_accum=grad_accum,
                                                  world_size=world_size, group=group, iterations=iterations,
                                                  seed=seed, epochs=epochs, micro_batches=micro_batches):
        for k, rows in enumerate(gens):
            yield epoch, k * passes, rows


def longest_rollout_batch(lengths, room: int, *, batch_size: int, grad_accum: int = 1, world_size: int = 1,
                          group: int = 1, iterations: int = 1, seed: int = 0, epochs: int = 1,
                          micro_batches: int | None = None) -> LongestBatch:
    """The widest training micro-batch of a generating method (rollout_generations): TRL pads a
    generation's prompts to its longest prompt and its completions to its longest completion (at most
    `room`), and every micro-batch cut from it keeps that width. `lengths`: each prompt's tokens + `room`
    (the data cache's `length` column of prompt records). The completions are taken at full length (a
    model that never stops early), so the widest micro-batch holds the longest prompt any rank's
    generation draws; batch_size rows of it, their completions the trained positions."""
    import numpy as np

    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) == 0:
        raise ValueError("no examples: the data holds nothing to train on")
    best = None
    for epoch, passes, gens in _generation_epochs(len(lengths), batch_size=batch_size, grad_accum=grad_accum,
                                                  world_size=world_size, group=group, iterations=iterations,
                                                  seed=seed, epochs=epochs, micro_batches=micro_batches):
        widths = lengths[gens].max(axis=2)  # [generations, ranks]
        k, r = np.unravel_index(int(np.argmax(widths)), widths.shape)
        if best is None or widths[k, r] > best[0]:
            best = (int(widths[k, r]), epoch, int(k) * passes, gens[k, r])
    width, epoch, index, ids = best
    return LongestBatch(batch_size, width, batch_size, int(lengths.max()), epoch, index, True, False, len(lengths),
                        ids=tuple(dict.fromkeys(int(i) for i in ids)),
                        trained_tokens=batch_size * min(room, width))


def longest_budget_batch(lengths, budget: int, *, seed: int = 0, packing: bool = False, num_replicas: int = 1,
                         epochs: int = 1, micro_batches: int | None = None, sampler=None,
                         step_batches: int = 0) -> LongestBatch:
    """The longest micro-batch of `training.tokens_per_batch` (finetune.data.sampler.TokenBudgetBatchSampler,
    replayed with the run's seed): the same batches every epoch, so the order matters only when the
    run stops early (`micro_batches`). `sampler`: that sampler, when the caller has already made it."""
    import numpy as np

    from finetune.data.sampler import TokenBudgetBatchSampler

    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) == 0:
        raise ValueError("no examples: the data holds nothing to train on")
    if sampler is None:
        sampler = TokenBudgetBatchSampler(lengths, budget, seed=seed, packing=packing, num_replicas=num_replicas,
                                          step_batches=step_batches)
    best, left = None, micro_batches
    for epoch in range(max(1, int(epochs))):
        if left is not None and left <= 0:
            break
        sampler.set_epoch(epoch)
        batches = sampler.epoch_batches()
        if left is not None:
            batches, left = batches[:left], left - len(batches)
        for i, batch in enumerate(batches):
            tokens = sampler.batch_tokens(batch)
            if best is None or tokens > best[0]:
                best = (tokens, epoch, i, batch)
        if micro_batches is None:
            break  # the same batches in every epoch
    tokens, epoch, index, batch = best
    sizes = lengths[batch]
    rows, per_row = (1, int(sizes.sum())) if packing else (len(batch), int(sizes.max()))
    return LongestBatch(rows, per_row, len(batch), int(lengths.max()), epoch, index, True, packing, len(lengths),
                        ids=tuple(int(x) for x in batch))


def with_trained_tokens(batch: LongestBatch, trained_of, mean_trained: float) -> LongestBatch:
    """`batch` with its trained tokens: `trained_of(ids)` counts them for the examples it knows;
    the rows it does not (random order: all but the longest) count `mean_trained` each."""
    from dataclasses import replace

    known = int(trained_of(list(batch.ids))) if batch.ids else 0
    unknown = max(0, batch.examples - len(batch.ids))
    return replace(batch, trained_tokens=known + round(unknown * mean_trained))
