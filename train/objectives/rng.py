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


# numpy's SeedSequence (O'Neill's seed_seq hash, numpy/random/bit_generator.pyx), vectorised over
# words: constructing `Philox(word)` costs ~30 us, almost all of it this hash, one word at a time.
_M32 = np.uint64(0xFFFFFFFF)
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_L, _MIX_R = np.uint64(0xCA01F9DD), np.uint64(0x4973F715)


def philox_keys(words) -> np.ndarray:
    """(E, 2) uint64: the key of `np.random.Philox(int(w))` for each word w (pool of 4 uint32, a
    64-bit word is at most 2 of them, so the pool is the word's two halves and two zeros)."""
    w = np.asarray(words, dtype=np.uint64).reshape(-1)  # (E,)
    u32 = np.uint64(32)
    entropy = [w & _M32, w >> u32, np.zeros_like(w), np.zeros_like(w)]
    const = _INIT_A

    def hashmix(v):
        nonlocal const
        v = v ^ np.uint64(const)
        const = (const * _MULT_A) & 0xFFFFFFFF
        v = (v * np.uint64(const)) & _M32
        return v ^ (v >> np.uint64(16))

    def mix(x, y):
        r = (_MIX_L * x - _MIX_R * y) & _M32
        return r ^ (r >> np.uint64(16))

    with np.errstate(over="ignore"):
        pool = [hashmix(e) for e in entropy]
        for src in range(4):
            for dst in range(4):
                if src != dst:
                    pool[dst] = mix(pool[dst], hashmix(pool[src]))
        const, out = _INIT_B, []  # generate_state(2, uint64): 4 uint32 words, little-endian pairs
        for v in pool:
            v = v ^ np.uint64(const)
            const = (const * _MULT_B) & 0xFFFFFFFF
            v = (v * np.uint64(const)) & _M32
            out.append(v ^ (v >> np.uint64(16)))
    return np.stack([out[0] | (out[1] << u32), out[2] | (out[3] << u32)], axis=1)


_FAST_OK: list[bool] = []  # philox_keys agrees with this numpy's Philox (checked once)


def generators(words):
    """Yield, for each word, a Generator in the state of `generator(word)`: one Generator re-keyed
    per word (~5 us instead of ~30 us), so use each before asking for the next. Falls back to
    `generator` if this numpy seeds Philox differently (checked once against numpy itself)."""
    words = np.asarray(words, dtype=np.uint64).reshape(-1)
    if not _FAST_OK:
        probe = np.array([0, 1, 2**32 + 5, 0x9E3779B97F4A7C15], dtype=np.uint64)
        ref = np.stack([np.random.Philox(int(x)).state["state"]["key"] for x in probe])
        _FAST_OK.append(bool((philox_keys(probe) == ref).all()))
    if not _FAST_OK[0]:
        for x in words:
            yield generator(x)
        return
    bits = np.random.Philox(0)
    g = np.random.Generator(bits)
    zeros = np.zeros(4, dtype=np.uint64)
    for key in philox_keys(words):
        bits.state = {"bit_generator": "Philox", "state": {"counter": zeros, "key": key}, "buffer": zeros,
                      "buffer_pos": 4, "has_uint32": 0, "uinteger": 0}  # = a fresh Philox(key)
        yield g
