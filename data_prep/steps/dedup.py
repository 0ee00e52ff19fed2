"""Exact dedup (hash of normalized text) and near dedup (MinHash LSH on word n-gram shingles).

Both compare an example's own text (question + answer) within one context key: rows that quote
the same page share most of their words but are not duplicates of each other.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from datasketch import MinHash

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


def exact_digest(text: str, context_key: str = "") -> bytes:
    """What exact dedup compares: the normalized text within its context key (16 bytes)."""
    return hashlib.blake2b((context_key + "\x00" + normalize_for_hash(text)).encode(), digest_size=16).digest()


def similarity(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """The MinHash estimate of the Jaccard similarity: the share of equal signature values."""
    return float(np.mean(sig_a == sig_b))


def best_first(match: tuple[float, str]) -> tuple[float, str]:
    """Order of (estimate, id) matches: the most similar first, then the smallest id."""
    return -match[0], match[1]


def duplicate_reason(first: str) -> str:
    return f"duplicate of {first}"


def near_reason(first: str, est: float) -> str:
    return f"near_duplicate of {first} (jaccard~{est:.2f})"


class BandIndex:
    """MinHash LSH buckets in two numpy arrays: band hash -> record number.

    The bucket layout is datasketch's (b bands of r rows, as its MinHashLSH chooses them for the
    threshold and weights); only the storage differs. datasketch's in-memory MinHashLSH keeps, per
    record and band, a bytes key and a Python set (5.5 KB per record measured with b = 14); here a
    record costs b x 12 bytes: 64-bit band hashes in one sorted array with their record numbers,
    plus an unsorted tail of recent inserts that is merged in when it fills. A band hash is a
    multiply-add of the band's r values with random odd 64-bit constants; two different bands
    colliding only adds a candidate, and every candidate is confirmed on the full signature.
    """

    TAIL = 16384

    def __init__(self, threshold: float, num_perm: int, weights: tuple[float, float], seed: int = 1):
        from datasketch import MinHashLSH

        # datasketch's public layout choice: an empty MinHashLSH exposes the b bands x r rows it
        # picked for this threshold and weights (its own buckets are never filled).
        layout = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=weights)
        self.b, self.r = layout.b, layout.r
        rng = np.random.default_rng(seed)
        self._mult = rng.integers(1, 2**62, size=(self.b, self.r), dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self._salt = rng.integers(0, 2**62, size=self.b, dtype=np.uint64)
        self._keys = np.empty(0, np.uint64)
        self._vals = np.empty(0, np.int64)
        self._tail_keys = np.empty(self.TAIL, np.uint64)
        self._tail_vals = np.empty(self.TAIL, np.int64)
        self._fill = 0

    def band_hashes(self, sig: np.ndarray) -> np.ndarray:
        bands = sig[: self.b * self.r].astype(np.uint64).reshape(self.b, self.r)
        with np.errstate(over="ignore"):
            return (bands * self._mult).sum(axis=1, dtype=np.uint64) + self._salt

    def query(self, hashes: np.ndarray) -> set[int]:
        out: set[int] = set()
        lo = np.searchsorted(self._keys, hashes, "left")
        hi = np.searchsorted(self._keys, hashes, "right")
        for a, z in zip(lo.tolist(), hi.tolist()):
            if z > a:
                out.update(self._vals[a:z].tolist())
        if self._fill:
            hit = np.isin(self._tail_keys[: self._fill], hashes)
            out.update(self._tail_vals[: self._fill][hit].tolist())
        return out

    def insert(self, hashes: np.ndarray, number: int) -> None:
        n = len(hashes)
        if self._fill + n > self.TAIL:
            self._merge()
        self._tail_keys[self._fill : self._fill + n] = hashes
        self._tail_vals[self._fill : self._fill + n] = number
        self._fill += n

    def _merge(self) -> None:
        k, v = self._tail_keys[: self._fill], self._tail_vals[: self._fill]
        order = np.argsort(k, kind="stable")
        k, v = k[order], v[order]
        pos = np.searchsorted(self._keys, k, "right")
        self._keys = np.insert(self._keys, pos, k)
        self._vals = np.insert(self._vals, pos, v)
        self._fill = 0

    @property
    def nbytes(self) -> int:
        return self._keys.nbytes + self._vals.nbytes + self._tail_keys.nbytes + self._tail_vals.nbytes


class Deduplicator:
    """Streaming dedup index. `check` returns None (kept, now indexed) or a reject reason.

    Memory per kept record (what grows with the corpus): its id, the exact-match digest, a
    128 x uint32 signature in one growing array, and b x 12 bytes of LSH buckets (`BandIndex`).
    """

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
        # "drop": a near-duplicate is rejected; "group": it is kept and `last_matches` names the
        # kept records it resembles (id, split group), best first, so that the caller can put
        # them all in one split group
        self.near_action = near_action
        self.last_matches: list[tuple[str, str]] = []
        self.threshold, self.num_perm, self.shingle_size = threshold, num_perm, shingle_size
        self._exact: dict[bytes, str] = {}
        # candidates are confirmed on the signatures below, so tilt LSH towards recall (few misses)
        self._lsh = BandIndex(threshold, num_perm, (0.1, 0.9), seed) if near else None
        # permutations are drawn once: MinHash() would redraw them for every record (~1 ms each)
        self._template = MinHash(num_perm=num_perm, seed=seed)
        # kept records by number: id, context key, split group, and the uint32 signature (row n)
        self._ids: list[str] = []
        self._num: dict[str, int] = {}
        self._ctx: list[str] = []
        self._group: list[str] = []
        self._sig = np.empty((1024, num_perm), np.uint32)
        # cluster representative -> number of duplicates dropped or grouped with it
        self.clusters: dict[str, int] = {}

    def minhash(self, text: str) -> MinHash | None:
        sh = shingles(text, self.shingle_size)
        if not sh:
            return None
        m = self._template.copy()
        m.update_batch(sh)
        return m

    def signature(self, text: str) -> np.ndarray | None:
        """The MinHash signature (num_perm x uint32) that near dedup compares; None without words."""
        m = self.minhash(text)
        return None if m is None else m.hashvalues.astype(np.uint32)

    def band_hashes(self, sig: np.ndarray) -> np.ndarray:
        assert self._lsh is not None
        return self._lsh.band_hashes(sig)

    def _similar(self, sig: np.ndarray, hashes: np.ndarray, context_key: str,
                 exclude: int | None = None) -> list[tuple[float, str]]:
        assert self._lsh is not None
        out = []
        for n in self._lsh.query(hashes):
            if n == exclude or self._ctx[n] != context_key:
                continue
            est = similarity(self._sig[n], sig)
            if est >= self.threshold:
                out.append((est, self._ids[n]))
        return sorted(out, key=best_first)

    def check(self, rec_id: str, text: str, context_key: str = "", group: str = "") -> str | None:
        self.last_matches = []
        if self.exact:
            digest = exact_digest(text, context_key)
            first = self._exact.get(digest)
            if first is not None:
                self.clusters[first] = self.clusters.get(first, 0) + 1
                return duplicate_reason(first)
            self._exact[digest] = rec_id
        if self.near:
            sig = self.signature(text)
            if sig is None:
                return None
            hashes = self.band_hashes(sig)
            similar = self._similar(sig, hashes, context_key)
            if similar:
                est, first = similar[0]
                self.clusters[first] = self.clusters.get(first, 0) + 1
                if self.near_action == "drop":
                    return near_reason(first, est)
                self.last_matches = [(k, self._group[self._num[k]]) for _, k in similar]
            n = len(self._ids)
            if n == len(self._sig):
                self._sig = np.concatenate([self._sig, np.empty_like(self._sig)])
            self._sig[n] = sig
            self._ids.append(rec_id)
            self._num[rec_id] = n
            self._ctx.append(context_key)
            self._group.append(group)
            self._lsh.insert(hashes, n)
        return None

    @property
    def size(self) -> int:
        """Kept records in the near-dup index (their numbers are 0..size-1)."""
        return len(self._ids)

    def number(self, rec_id: str) -> int | None:
        return self._num.get(rec_id)

    def id_of(self, number: int) -> str:
        return self._ids[number]

    def neighbours(self, rec_id: str) -> list[str]:
        """Kept records near-similar to a kept record (used by the leakage check)."""
        n = self._num.get(rec_id)
        if n is None or self._lsh is None:
            return []
        sig = self._sig[n]
        return [k for _, k in self._similar(sig, self._lsh.band_hashes(sig), self._ctx[n], exclude=n)]


class NearEdge(NamedTuple):
    """Two records confirmed near-similar (same context key, estimate >= threshold); a < b in
    document order. What a distributed build computes instead of querying a streaming index."""

    a: int
    b: int
    est: float
    a_id: str
    b_id: str
    a_group: str
    b_group: str


@dataclass
class NearOutcome:
    dropped: dict[int, str] = field(default_factory=dict)  # document order of a dropped record -> reason
    matched: Counter = field(default_factory=Counter)  # kept record id -> records matched to it
    kept_near: int = 0  # near-similar records kept (near_action=group)
    unions: list[tuple[str, str]] = field(default_factory=list)  # split groups to join (group)


def resolve_near(edges: Iterable[NearEdge], near_action: str = "drop") -> NearOutcome:
    """`Deduplicator.check`'s near rule, applied at once to every confirmed edge of a corpus.

    Records are visited in document order and compared with the earlier records that were kept,
    as the streaming index does: under "drop" a record similar to one of them is dropped, naming
    the best (most similar, then smallest id); a record that only resembles a dropped one is kept
    (A~B, B~C, A!~C keeps A and C). Under "group" every record is kept and its split group is
    joined with the group of every earlier record it resembles: connected components of the
    edges, so no near-duplicate pair can end up in two splits.
    """
    earlier: dict[int, list[tuple[int, float, str, str]]] = defaultdict(list)
    who: dict[int, tuple[str, str]] = {}
    for e in edges:
        earlier[e.b].append((e.a, e.est, e.a_id, e.a_group))
        who[e.b] = (e.b_id, e.b_group)
    out = NearOutcome()
    for b in sorted(earlier):
        kept = [(est, a_id, a_group) for a, est, a_id, a_group in earlier[b] if a not in out.dropped]
        if not kept:
            continue
        kept.sort(key=lambda m: best_first((m[0], m[1])))
        est, first, _ = kept[0]
        out.matched[first] += 1
        if near_action == "drop":
            out.dropped[b] = near_reason(first, est)
        else:
            out.kept_near += 1
            out.unions += [(who[b][1], a_group) for _, _, a_group in kept]
    return out
