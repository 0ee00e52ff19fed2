"""Length-grouped, batch-shuffled sampling: the kit's default batching (training.group_by_length)."""

from __future__ import annotations

import random
from pathlib import Path

from finetune.data.sampler import LengthGroupedShuffledSampler


def _lengths(n: int = 1000, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(60, 370) for _ in range(n)]


def _padding_fraction(lengths: list[int], batches: list[list[int]]) -> float:
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return 1 - sum(lengths[i] for b in batches for i in b) / padded


def test_every_example_once_per_epoch_and_only_the_last_batch_is_partial():
    lengths = _lengths(1003)
    s = LengthGroupedShuffledSampler(lengths, 8, window=16, seed=3)
    for epoch in range(3):
        s.set_epoch(epoch)
        batches = s.batches()
        flat = list(iter(s))
        assert sorted(flat) == list(range(1003))
        assert [i for b in batches for i in b] == flat
        assert all(len(b) == 8 for b in batches[:-1]) and len(batches[-1]) == 1003 % 8


def test_much_less_padding_than_random_batches():
    lengths = _lengths()
    s = LengthGroupedShuffledSampler(lengths, 8, window=64, seed=0)
    rng = random.Random(0)
    perm = list(range(len(lengths)))
    rng.shuffle(perm)
    random_batches = [perm[i:i + 8] for i in range(0, len(perm), 8)]
    grouped = _padding_fraction(lengths, s.batches())
    rand = _padding_fraction(lengths, random_batches)
    assert rand > 0.25 and grouped < 0.03, (rand, grouped)


def test_lengths_are_mixed_across_steps():
    """transformers' LengthGroupedSampler runs every window from long to short; ours must not:
    the batch's position in the epoch must not predict its length."""
    lengths = _lengths(4000)
    s = LengthGroupedShuffledSampler(lengths, 8, window=64, seed=1)
    means = [sum(lengths[i] for i in b) / len(b) for b in s.batches()[:-1]]
    n = len(means)
    # rank correlation of (step, batch mean length) over the epoch and within every window-sized run
    def spearman(xs):
        ranks = {v: r for r, v in enumerate(sorted(range(len(xs)), key=xs.__getitem__))}
        ry = [ranks[i] for i in range(len(xs))]
        m = (len(xs) - 1) / 2
        cov = sum((i - m) * (r - m) for i, r in enumerate(ry))
        var = sum((i - m) ** 2 for i in range(len(xs)))
        return cov / var
    assert abs(spearman(means)) < 0.1
    window_corr = [spearman(means[i:i + 64]) for i in range(0, n - 63, 64)]
    assert max(abs(c) for c in window_corr) < 0.5, window_corr
    # the first half of the epoch and the second have the same length mix
    half = n // 2
    assert abs(sum(means[:half]) / half - sum(means[half:]) / (n - half)) < 10


def test_order_is_a_function_of_seed_and_epoch():
    lengths = _lengths(200)
    a = LengthGroupedShuffledSampler(lengths, 4, seed=7)
    b = LengthGroupedShuffledSampler(lengths, 4, seed=7)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)
    assert list(LengthGroupedShuffledSampler(lengths, 4, seed=8)) != list(a)


def test_trainer_uses_it_by_default_and_not_when_off(tiny_model, chat_data, tmp_path):
    """The real training path: batches the Trainer's DataLoader yields are length-grouped."""
    from finetune.config import load_config
    from finetune.models.loading import load_tokenizer
    from finetune.training.arguments import training_arguments
    from finetune.training.launch import resolve_launch
    from finetune.training.recipe import _setup_data, _setup_trainer

    def loader(*over: str):
        cfg = load_config(None, [f"model={tiny_model}", f"data.train={chat_data['train']}",
                                 f"output_dir={tmp_path / 'run'}", "training.batch_size=4",
                                 "training.report_to=[none]", *over])
        tok = load_tokenizer(cfg.model)
        train_ds, _, _ = _setup_data(cfg, tok)
        from kitcore.runtime import current

        args = training_arguments(cfg, Path(cfg.output_dir), False, resolve_launch(cfg, current()))
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(cfg.model)
        trainer = _setup_trainer(cfg, args, Path(cfg.output_dir), model, tok, train_ds, None)
        return trainer, list(trainer.get_train_dataloader())

    trainer, batches = loader()
    assert isinstance(trainer._get_train_sampler(), LengthGroupedShuffledSampler)
    pad_grouped = sum(int((b["attention_mask"] == 0).sum()) for b in batches)
    trainer, batches = loader("training.group_by_length=false")
    assert not isinstance(trainer._get_train_sampler(), LengthGroupedShuffledSampler)
    pad_random = sum(int((b["attention_mask"] == 0).sum()) for b in batches)
    assert pad_grouped < 0.5 * pad_random, (pad_grouped, pad_random)


def test_the_private_sampler_hook_has_the_signature_the_override_expects():
    """transformers has no public hook for the train sampler; KitTrainer overrides the private one.
    When transformers changes it, this fails (and importing finetune.training.recipe raises) rather than the
    override silently never being called."""
    import inspect

    from transformers import Trainer

    from finetune.methods.trainer import KitTrainer

    assert list(inspect.signature(Trainer._get_train_sampler).parameters) == ["self", "train_dataset"]
    assert KitTrainer._get_train_sampler is not Trainer._get_train_sampler
