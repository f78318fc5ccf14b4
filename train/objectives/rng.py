"""Counter-based randomness: every random choice is a pure function of (seed, epoch, ids).

The stream never carries a random generator between batches. Each example's split point, noise
mask and denoiser are derived from a 64-bit word computed by hashing (seed, epoch, document id,
piece index, salt) with SplitMix64 (Steele et al. 2014; the seeding hash of `java.util.SplittableRandom`).
So an example is the same whichever rank, batch or resume produces it, and a resumed stream
needs no saved generator state.
"""
from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)

# Salts keep the streams of different random choices independent of each other.
SALT_PIECE = 1  # per-example word (split point, noise mask)
SALT_DOC = 2  # per-document word (UL2 denoiser choice)
SALT_PERM = 3  # epoch permutation
SALT_SPLIT = 4  # held-out split of documents


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser, elementwise on uint64 (wrapping arithmetic)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def mix(*parts) -> np.ndarray:
    """Hash a tuple of integers / integer arrays (broadcast together) into uint64 words."""
    h = np.zeros((), dtype=np.uint64)
    for p in parts:
        p = np.asarray(p).astype(np.int64).astype(np.uint64)
        h = splitmix64(h ^ p)
    return h


def uniform_int(words: np.ndarray, low, high) -> np.ndarray:
    """Integers uniform in [low, high] (inclusive) from uint64 words (bias < 2**-40 for spans < 2**24)."""
    low = np.asarray(low, dtype=np.int64)
    span = (np.asarray(high, dtype=np.int64) - low + 1).astype(np.uint64)
    return low + (np.asarray(words, dtype=np.uint64) % np.maximum(span, np.uint64(1))).astype(np.int64)


def uniform_float(words: np.ndarray) -> np.ndarray:
    """Floats uniform in [0, 1) from the top 53 bits of uint64 words."""
    return (np.asarray(words, dtype=np.uint64) >> np.uint64(11)).astype(np.float64) * (2.0**-53)


def generator(word) -> np.random.Generator:
    """A numpy Generator seeded by one word (for the noise mask of one example)."""
    return np.random.Generator(np.random.Philox(int(np.uint64(word))))
