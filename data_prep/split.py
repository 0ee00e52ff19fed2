"""Deterministic group-aware train/val/test split.

Records of one group (one source document, or a near-duplicate cluster merged into it) always
land in the same split. A group's place in the seeded shuffle is a 64-bit hash of the seed and
its root name (`split_key`), so the assignment depends on the seed and the data, not on dict
order, processing order or the number of workers.

Groups are taken in key order and fill test, then val, up to their share of records; the rest is
train. That fill is summed up by two cut points in key space (`SplitCuts`): a group's split is
then a comparison of its key with the cuts, which any worker can make for its own records once
the cuts are known. Two groups whose keys collide (about n^2 / 2^65 for n groups) count as one
unit of the fill and always share a split.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

NO_CUT = 1 << 64  # above every key: the split before it takes everything that is left


class UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        parent = self.parent.setdefault(x, x)
        if parent != x:
            root = self.find(parent)
            self.parent[x] = root
            return root
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # the smaller name wins so the root does not depend on the order of unions
            lo, hi = sorted((ra, rb))
            self.parent[hi] = lo


def split_key(seed: int, group: str) -> int:
    """A group's position in the seeded shuffle (blake2b of seed and name, as a big-endian int)."""
    digest = hashlib.blake2b(f"{seed}\x00{group}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


@dataclass(frozen=True)
class SplitCuts:
    """Keys below `test` are test, keys below `val` (and not test) are val, the rest is train."""

    test: int = NO_CUT
    val: int = NO_CUT

    def split_of(self, key: int) -> str:
        if key < self.test:
            return "test"
        return "val" if key < self.val else "train"


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError("val_fraction and test_fraction must be in [0, 1) and sum to less than 1")


def split_cuts(keys: np.ndarray, sizes: np.ndarray, val_fraction: float, test_fraction: float) -> SplitCuts:
    """The cuts for groups given as parallel arrays of keys (uint64, possibly repeated) and
    record counts. Test takes groups in key order until it holds its share of records
    (overshooting by at most one group), then val does; at least one group stays in train
    whenever there are two or more. A share under half a record takes nothing."""
    _check_fractions(val_fraction, test_fraction)
    keys = np.asarray(keys, dtype=np.uint64)
    # equal keys are one unit; np.unique sorts them
    keys, inverse = np.unique(keys, return_inverse=True)
    sizes = np.bincount(inverse.ravel(), weights=np.asarray(sizes, dtype=np.float64), minlength=len(keys))
    n = len(keys)
    total = float(sizes.sum())
    csum = np.cumsum(sizes)
    cuts, start = [], 0
    for target in (test_fraction * total, val_fraction * total):
        end = start
        if target >= 0.5 and n - start > 1:
            base = csum[start - 1] if start else 0.0
            # take groups while what is taken is below the target: up to and including the first
            # group at which the running sum reaches it; never the last group
            end = min(int(np.searchsorted(csum, base + target, "left")) + 1, n - 1)
            end = max(end, start)
        cuts.append(int(keys[end]) if end < n else NO_CUT)
        start = end
    return SplitCuts(test=cuts[0], val=cuts[1])


def assign_splits(
    group_sizes: Mapping[str, int], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, str]:
    """Map each group to "train"/"val"/"test" (the cuts of `split_cuts`, applied)."""
    _check_fractions(val_fraction, test_fraction)
    keys = {g: split_key(seed, g) for g in group_sizes}
    by_key: Counter[int] = Counter()
    for g, n in group_sizes.items():
        by_key[keys[g]] += n
    cuts = split_cuts(
        np.fromiter(by_key.keys(), np.uint64, len(by_key)),
        np.fromiter(by_key.values(), np.int64, len(by_key)),
        val_fraction,
        test_fraction,
    )
    return {g: cuts.split_of(k) for g, k in keys.items()}
