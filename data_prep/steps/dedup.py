"""Exact dedup (hash of normalized text) and near dedup (MinHash LSH on word n-gram shingles).

Both compare an example's own text (question + answer) within one context key: rows that quote
the same page share most of their words but are not duplicates of each other.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
from datasketch import MinHash, MinHashLSH

_WORDS = re.compile(r"\w+")


def normalize_for_hash(text: str) -> str:
    return " ".join(_WORDS.findall(text.lower()))


def shingles(text: str, n: int = 5) -> set[bytes]:
    """Word n-gram shingles of the lowercased text; a text shorter than n is one shingle."""
    words = _WORDS.findall(text.lower())
    if len(words) < n:
        return {" ".join(words).encode()} if words else set()
    return {" ".join(words[i : i + n]).encode() for i in range(len(words) - n + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class Deduplicator:
    """Streaming dedup index. `check` returns None (kept, now indexed) or a reject reason."""

    def __init__(
        self,
        exact: bool = True,
        near: bool = True,
        threshold: float = 0.8,
        num_perm: int = 128,
        shingle_size: int = 5,
        seed: int = 1,
        near_action: str = "drop",
    ) -> None:
        self.exact, self.near = exact, near
        # "drop": a near-duplicate is rejected; "group": it is kept and `last_match` names the
        # kept record it resembles, so the caller can put both in one split group
        self.near_action = near_action
        self.last_match: tuple[str, str] | None = None
        self.threshold, self.num_perm, self.shingle_size = threshold, num_perm, shingle_size
        self._exact: dict[bytes, str] = {}
        # candidates are confirmed on the signatures below, so tilt LSH towards recall (few misses)
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.1, 0.9)) if near else None
        # permutations are drawn once: MinHash() would redraw them for every record (~1 ms each)
        self._template = MinHash(num_perm=num_perm, seed=seed)
        # uint32 signatures of kept records, to confirm LSH candidates and for the leakage check
        self._sigs: dict[str, tuple[str, str, np.ndarray]] = {}  # id -> (context key, group, signature)
        self.clusters: dict[str, list[str]] = {}

    def minhash(self, text: str) -> MinHash | None:
        sh = shingles(text, self.shingle_size)
        if not sh:
            return None
        m = self._template.copy()
        m.update_batch(sh)
        return m

    def _similar(self, m: MinHash, context_key: str, exclude: str | None = None) -> list[tuple[float, str]]:
        assert self._lsh is not None
        out = []
        for key in self._lsh.query(m):
            ctx, _, sig = self._sigs[key]
            if key == exclude or ctx != context_key:
                continue
            est = float(np.mean(sig == m.hashvalues))
            if est >= self.threshold:
                out.append((est, key))
        return sorted(out, key=lambda x: (-x[0], x[1]))

    def check(self, rec_id: str, text: str, context_key: str = "", group: str = "") -> str | None:
        self.last_match = None
        if self.exact:
            digest = hashlib.blake2b(
                (context_key + "\x00" + normalize_for_hash(text)).encode(), digest_size=16
            ).digest()
            first = self._exact.get(digest)
            if first is not None:
                self.clusters.setdefault(first, []).append(rec_id)
                return f"duplicate of {first}"
            self._exact[digest] = rec_id
        if self.near:
            m = self.minhash(text)
            if m is None:
                return None
            similar = self._similar(m, context_key)
            if similar:
                est, first = similar[0]
                self.clusters.setdefault(first, []).append(rec_id)
                if self.near_action == "drop":
                    return f"near_duplicate of {first} (jaccard~{est:.2f})"
                self.last_match = (first, self._sigs[first][1])
            self._lsh.insert(rec_id, m)
            self._sigs[rec_id] = (context_key, group, m.hashvalues.astype(np.uint32))
        return None

    def neighbours(self, rec_id: str) -> list[str]:
        """Kept records near-similar to a kept record (used by the leakage check)."""
        if rec_id not in self._sigs:
            return []
        ctx, _, sig = self._sigs[rec_id]
        m = self._template.copy()
        m.hashvalues = sig.astype(self._template.hashvalues.dtype)
        return [k for _, k in self._similar(m, ctx, exclude=rec_id)]
