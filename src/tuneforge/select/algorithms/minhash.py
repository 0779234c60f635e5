"""Near-duplicate clusters by MinHash and locality-sensitive hashing (Broder 1997; Leskovec, Rajaraman
& Ullman, *Mining of Massive Datasets*, ch. 3 "Finding Similar Items").

A text becomes a set of shingles (character n-grams of its normalised form). For random hash
functions h_k, P[min h_k(A) = min h_k(B)] = Jaccard(A, B), so the fraction of agreeing signature
entries estimates the Jaccard similarity. LSH splits the signature into b bands of r rows; two texts
become a candidate pair when any band agrees entirely, which happens with probability
1 - (1 - s^r)^b: a sharp step near s = (1/b)^(1/r). Candidates are then confirmed with the estimate.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import defaultdict

import numpy as np

# h(x) = (a x + b) mod p with a, b < 2^31 and x < 2^32 keeps a x + b below 2^64: exact in uint64.
PRIME_ABOVE_2_32 = 4294967311


def normalise_text(text: str) -> str:
    """Case, accents, punctuation and runs of whitespace do not make two texts different."""
    text = unicodedata.normalize("NFKD", text.lower())
    text = "".join(c for c in text if not unicodedata.combining(c))
    text = re.sub(r"[^\w\s]", " ", text)
    return re.sub(r"\s+", " ", text).strip()


def shingles(text: str, size: int = 5) -> set[str]:
    normalised = normalise_text(text)
    if len(normalised) <= size:
        return {normalised}
    return {normalised[i:i + size] for i in range(len(normalised) - size + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class MinHasher:
    def __init__(self, num_perm: int = 128, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, 1 << 31, size=num_perm, dtype=np.uint64)
        self.b = rng.integers(0, 1 << 31, size=num_perm, dtype=np.uint64)

    def signature(self, items: set[str]) -> np.ndarray:
        hashed = np.array([_hash32(item) for item in items], dtype=np.uint64)  # (S,)
        values = (hashed[:, None] * self.a[None, :] + self.b[None, :]) % np.uint64(PRIME_ABOVE_2_32)  # (S, P)
        return values.min(axis=0)


def _hash32(item: str) -> int:
    return int.from_bytes(hashlib.blake2b(item.encode(), digest_size=4).digest(), "little")


def near_duplicate_clusters(texts: list[str], threshold: float = 0.8, shingle_size: int = 5,
                            num_perm: int = 128, bands: int = 32, seed: int = 0) -> list[list[int]]:
    """Groups of indices whose texts are exact duplicates after normalisation, or whose estimated
    Jaccard similarity reaches ``threshold``; singletons are left out. Clusters are transitive
    (union-find), sorted by their first index."""
    parent = list(range(len(texts)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)

    exact: dict[str, int] = {}
    for index, text in enumerate(texts):
        first = exact.setdefault(normalise_text(text), index)
        if first != index:
            union(first, index)
    hasher = MinHasher(num_perm, seed)
    rows = num_perm // bands
    signatures = np.stack([hasher.signature(shingles(t, shingle_size)) for t in texts]) if texts else np.zeros((0, num_perm))
    buckets: dict[tuple[int, bytes], list[int]] = defaultdict(list)
    for index in range(len(texts)):
        for band in range(bands):
            buckets[(band, signatures[index, band * rows:(band + 1) * rows].tobytes())].append(index)
    checked: set[tuple[int, int]] = set()
    for members in buckets.values():
        for position, i in enumerate(members):
            for j in members[position + 1:]:
                if (i, j) in checked or find(i) == find(j):
                    continue
                checked.add((i, j))
                if float(np.mean(signatures[i] == signatures[j])) >= threshold:
                    union(i, j)
    groups: dict[int, list[int]] = defaultdict(list)
    for index in range(len(texts)):
        groups[find(index)].append(index)
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: g[0])
