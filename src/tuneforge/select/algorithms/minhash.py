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


def choose_bands(num_perm: int, threshold: float) -> int:
    """Bands whose step (1/b)^(1/r) sits a little below ``threshold``: a pair at the threshold is
    almost surely a candidate, while clearly different pairs rarely are."""
    divisors = [b for b in range(1, num_perm + 1) if num_perm % b == 0]
    return min(divisors, key=lambda b: abs((1 / b) ** (b / num_perm) - 0.9 * threshold))


def near_duplicate_clusters(texts: list[str], threshold: float = 0.8, shingle_size: int = 5,
                            num_perm: int = 128, seed: int = 0) -> list[list[int]]:
    """Groups of indices whose texts are exact duplicates after normalisation, or whose estimated
    Jaccard similarity with the group's first text reaches ``threshold``; singletons are left out.

    Leader clustering in text order: a text joins the most similar earlier leader among its LSH
    candidates, or becomes a leader. Every member is similar to its leader itself, so templated data
    cannot chain distinct texts into one giant cluster (as a transitive closure would), and only
    leaders are compared, never all pairs of a bucket."""
    hasher = MinHasher(num_perm, seed)
    bands = choose_bands(num_perm, threshold)
    rows = num_perm // bands
    leader_of_text: dict[str, int] = {}
    leader_of: dict[int, int] = {}
    buckets: dict[tuple[int, bytes], list[int]] = defaultdict(list)
    signatures = np.zeros((len(texts), num_perm), dtype=np.uint64)
    for index, text in enumerate(texts):
        normalised = normalise_text(text)
        if normalised in leader_of_text:
            leader_of[index] = leader_of_text[normalised]
            continue
        signatures[index] = hasher.signature(shingles(text, shingle_size))
        keys = [(band, signatures[index, band * rows:(band + 1) * rows].tobytes()) for band in range(bands)]
        candidates = sorted({leader for key in keys for leader in buckets.get(key, ())})
        if candidates:
            agreement = (signatures[candidates] == signatures[index]).mean(axis=1)
            best = int(agreement.argmax())
            if agreement[best] >= threshold:
                leader_of[index] = leader_of_text[normalised] = candidates[best]
                continue
        leader_of_text[normalised] = index
        for key in keys:
            buckets[key].append(index)
    groups: dict[int, list[int]] = defaultdict(list)
    for member, leader in leader_of.items():
        groups[leader].append(member)
    return sorted(([leader, *sorted(members)] for leader, members in groups.items()), key=lambda g: g[0])
