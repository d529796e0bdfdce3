"""Duplicate removal: exact (a digest of the text) and near (MinHash + LSH on word 5-gram shingles).

OPT removed documents whose MinHash-estimated Jaccard similarity with an earlier one was >= 0.95. Here a
document's signature is the minimum of `num_perm` universal hashes (a*x + b mod 2^61-1, truncated to 32 bits)
over its shingle hashes; LSH cuts the signature into bands, and a document sharing a band with a kept one is
compared to it signature against signature. Everything is a fixed function of the text, so the decisions
are the same in every process and on every rerun. Memory: 4 bytes x num_perm per kept document, so this
suits corpora up to millions of documents; web-scale dedup wants a dedicated tool.
"""
from __future__ import annotations

import hashlib
import re
import zlib

import numpy as np

MERSENNE_PRIME = np.uint64((1 << 61) - 1)
SHINGLE_WORDS = 5
_WORD = re.compile(r"\w+")


def exact_digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def shingle_hashes(text: str, width: int = SHINGLE_WORDS) -> np.ndarray:
    """32-bit hashes of the lower-cased word `width`-grams (the whole text when it has fewer words)."""
    words = _WORD.findall(text.lower())
    grams = [" ".join(words[i:i + width]) for i in range(max(1, len(words) - width + 1))]
    return np.unique(np.fromiter((zlib.crc32(g.encode("utf-8")) for g in grams), dtype=np.uint64, count=len(grams)))


class MinHasher:
    def __init__(self, num_perm: int = 128, seed: int = 1):
        rng = np.random.RandomState(seed)
        # a, b < 2^32 and x < 2^32 keep a*x + b below 2^64: no overflow in uint64.
        self.a = rng.randint(1, 1 << 32, size=num_perm, dtype=np.uint64)
        self.b = rng.randint(0, 1 << 32, size=num_perm, dtype=np.uint64)

    def signature(self, text: str, block: int = 4096) -> np.ndarray:
        shingles = shingle_hashes(text)
        result = np.full(len(self.a), np.iinfo(np.uint64).max, dtype=np.uint64)
        for start in range(0, len(shingles), block):
            x = shingles[start:start + block, None]
            np.minimum(result, ((x * self.a + self.b) % MERSENNE_PRIME).min(axis=0), out=result)
        return (result & np.uint64(0xFFFFFFFF)).astype(np.uint32)


class NearDuplicateIndex:
    """Kept signatures, bucketed by LSH band. With 16 bands of 8 rows a pair at Jaccard 0.95 shares a band
    with probability 1 - (1 - 0.95^8)^16 > 0.99999997."""

    def __init__(self, num_perm: int = 128, bands: int = 16, threshold: float = 0.95):
        if num_perm % bands:
            raise ValueError(f"num_perm ({num_perm}) must be a multiple of bands ({bands})")
        self.rows, self.threshold = num_perm // bands, threshold
        self.buckets: list[dict[bytes, list[int]]] = [{} for _ in range(bands)]
        self.signatures: list[np.ndarray] = []

    def is_near_duplicate(self, signature: np.ndarray) -> bool:
        """True when a kept document is at least `threshold` similar; otherwise keep this one and say False."""
        keys = [signature[i * self.rows:(i + 1) * self.rows].tobytes() for i in range(len(self.buckets))]
        candidates = {j for band, key in zip(self.buckets, keys) for j in band.get(key, ())}
        if any(np.mean(self.signatures[j] == signature) >= self.threshold for j in candidates):
            return True
        for band, key in zip(self.buckets, keys):
            band.setdefault(key, []).append(len(self.signatures))
        self.signatures.append(signature)
        return False
