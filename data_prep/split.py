"""Deterministic group-aware train/val/test split.

Records of one group (one source document, or a near-duplicate cluster merged into it) always
land in the same split. Groups are shuffled by a seeded hash of their name, so the assignment
depends on the seed and the data, not on dict order or the number of workers.
"""

from __future__ import annotations

import hashlib


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


def _order_key(seed: int, group: str) -> bytes:
    return hashlib.blake2b(f"{seed}\x00{group}".encode(), digest_size=8).digest()


def assign_splits(
    group_sizes: dict[str, int], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, str]:
    """Map each group to "train"/"val"/"test".

    Groups are taken in seeded-hash order and fill test, then val, up to their share of
    records (overshooting by at most one group); the rest is train. At least one group
    stays in train whenever there are two or more groups.
    """
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError("val_fraction and test_fraction must be in [0, 1) and sum to less than 1")
    total = sum(group_sizes.values())
    order = sorted(group_sizes, key=lambda g: _order_key(seed, g))
    targets = [("test", test_fraction * total), ("val", val_fraction * total)]
    out: dict[str, str] = {}
    i = 0
    for name, target in targets:
        filled = 0
        while i < len(order) and filled < target and (len(order) - i) > 1 and target >= 0.5:
            out[order[i]] = name
            filled += group_sizes[order[i]]
            i += 1
    for g in order[i:]:
        out[g] = "train"
    return out
