"""The epoch plan at corpus scale (data.epoch_order='feistel'): no array of one entry per document.

Three pieces replace the per-process int64 arrays of the 'permutation' order (the split's ids, the
epoch's order, the permutation and a copy of the lengths: ~32 bytes per document per process):

- `FeistelPermutation`: a keyed bijection of [0, N), evaluated on a chunk of positions at a time
  (O(1) per position, nothing stored). A Feistel network on the 2^b >= N codes of b bits (b =
  bit length of N-1, at least 2; unbalanced halves of floor(b/2) and ceil(b/2) bits that swap
  each round, 6 rounds, each round function a SplitMix64 hash of (key, round, half)), made a
  bijection of [0, N) by cycle-walking: a code >= N is encrypted again until it falls below N
  (2^b < 2N, so fewer than 2 steps on average). The key is rng.mix(seed, epoch, SALT_PERM).
- `HashSplit`: a split as a predicate, the held-out hash rule of corpus.held_out_mask (document i
  is held out iff uniform(mix(SALT_SPLIT, i)) < eval_fraction; at least one held out when there are
  two or more documents), the same documents as the mask. An epoch visits the positions [0, limit)
  of the whole store (limit: the first max_documents of the split, else the store size) and passes
  over the positions whose document belongs to the other split: they yield no piece and are not
  counted in the stream's stats (they are not the split's documents).
- `MappedTokenStore` (train/data/tokenize.py): a TokenStore whose lengths and offsets are zero-copy views of the memory-
  mapped Arrow columns (int32, per Arrow chunk), not an int64 copy: file-backed pages that every
  process on a node shares through the page cache.

Resume stays O(1): position -> document is computed, so `load_state_dict` needs no permutation.
"""
from __future__ import annotations

import numpy as np

from ..objectives import rng

ROUNDS = 6
_SCAN = 1 << 16  # documents hashed at a time when a split is scanned (bounded memory)


class FeistelPermutation:
    """A keyed bijection of [0, n): `self(positions)` -> documents (int64), elementwise."""

    def __init__(self, n: int, key: int):
        if n < 1:
            raise ValueError(f"FeistelPermutation needs n >= 1, got {n}")
        self.n = int(n)
        bits = max(2, int(self.n - 1).bit_length())
        self.lo_bits = bits // 2  # the halves: (hi, lo) of lo_bits / bits - lo_bits, swapped each round
        self.bits = bits
        self.keys = [np.uint64(int(rng.mix(key, r))) for r in range(ROUNDS)]

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        a, b = self.bits - self.lo_bits, self.lo_bits  # x = L * 2^b + R, L of a bits, R of b bits
        for k in self.keys:
            L, R = x >> np.uint64(b), x & np.uint64((1 << b) - 1)
            f = rng.splitmix64(k ^ R) & np.uint64((1 << a) - 1)
            x = (R << np.uint64(a)) | (L ^ f)  # the new L is R (b bits), the new R has a bits
            a, b = b, a
        return x  # ROUNDS is even: back to the (a, b) layout

    def __call__(self, positions) -> np.ndarray:
        x = self._encrypt(np.asarray(positions, dtype=np.uint64))
        out = x >= np.uint64(self.n)
        while out.any():  # cycle-walking: stays within the cycle of the starting position
            x[out] = self._encrypt(x[out])
            out[out] = x[out] >= np.uint64(self.n)
        return x.astype(np.int64)


def held_out(docs, fraction: float) -> np.ndarray:
    """The hash half of corpus.held_out_mask, on some document indices."""
    return rng.uniform_float(rng.mix(rng.SALT_SPLIT, np.asarray(docs, dtype=np.int64))) < fraction


class HeldOutRule:
    """corpus.held_out_mask(num_docs, fraction) as a rule: what `load_corpus(..., lazy_split=True)`
    returns in place of the mask. `forced` is the document held out by the at-least-one rule (or
    -1): found by scanning until a held-out document appears (~1/fraction documents)."""

    def __init__(self, num_docs: int, fraction: float):
        self.num_docs, self.fraction, self.forced = int(num_docs), float(fraction), -1
        if self.fraction > 0 and self.num_docs >= 2:
            best, best_u = -1, 2.0
            for lo in range(0, self.num_docs, _SCAN):
                idx = np.arange(lo, min(lo + _SCAN, self.num_docs))
                u = rng.uniform_float(rng.mix(rng.SALT_SPLIT, idx))
                if (u < self.fraction).any():
                    best = -1
                    break
                j = int(np.argmin(u))
                if u[j] < best_u:
                    best, best_u = lo + j, float(u[j])
            self.forced = best

    def mask(self, docs) -> np.ndarray:
        docs = np.asarray(docs, dtype=np.int64)
        m = held_out(docs, self.fraction) if self.fraction > 0 else np.zeros(docs.shape, dtype=bool)
        return m | (docs == self.forced) if self.forced >= 0 else m

    def any(self) -> bool:
        return self.fraction > 0 and (self.forced >= 0 or self.num_docs >= 2 or bool(self.mask([0])[0]))

    def split(self, held: bool, max_documents: int = 0) -> "HashSplit":
        return HashSplit(self, held, max_documents)


class HashSplit:
    """The documents i < limit of one side of a HeldOutRule (held or not), as a predicate. Array-like
    for the few consumers that list a split (len, iteration, tolist, np.asarray: chunked scans)."""

    def __init__(self, rule: HeldOutRule, held: bool, max_documents: int = 0):
        self.rule, self.held, self.max_documents = rule, bool(held), int(max_documents)
        self.limit = rule.num_docs
        self._count = None
        if self.max_documents:  # the first max_documents members: where the last of them is
            seen = 0
            for lo, members in self._scan():
                if seen + len(members) >= self.max_documents:
                    self.limit = int(members[self.max_documents - seen - 1]) + 1
                    break
                seen += len(members)

    def contains(self, docs) -> np.ndarray:
        """Boolean: which of `docs` (indices < limit) belong to the split."""
        return self.rule.mask(docs) == self.held

    def _scan(self):
        for lo in range(0, self.limit, _SCAN):
            idx = np.arange(lo, min(lo + _SCAN, self.limit), dtype=np.int64)
            yield lo, idx[self.contains(idx)]

    def any(self) -> bool:
        return any(len(m) for _, m in self._scan())

    def describe(self) -> list:
        return [self.rule.num_docs, self.rule.fraction, self.rule.forced, self.held, self.limit]

    def __len__(self) -> int:
        if self._count is None:
            self._count = sum(len(m) for _, m in self._scan())
        return self._count

    def __iter__(self):
        for _, m in self._scan():
            yield from m.tolist()

    def tolist(self) -> list[int]:
        return list(iter(self))

    def __array__(self, dtype=None, copy=None):
        parts = [m for _, m in self._scan()]
        out = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        return out if dtype is None else out.astype(dtype)


class ArraySplit:
    """An explicit array of document ids seen as a split of positions [0, len) (feistel order over
    a caller's ids: the order is computed, the ids array stays the caller's)."""

    def __init__(self, doc_ids):
        self.ids = np.asarray(doc_ids, dtype=np.int64)
        self.limit = len(self.ids)

    def describe(self) -> list:
        return [int(len(self.ids)), int(self.ids[:64].sum())]

    def any(self) -> bool:
        return self.limit > 0


class FeistelPlan:
    """Epoch positions [0, n_positions) -> (documents, kept) by a FeistelPermutation per epoch
    (identity with shuffle=False); `kept` is False where the document is not the split's."""

    def __init__(self, split, seed: int, shuffle: bool):
        self.split = split if isinstance(split, HashSplit) else ArraySplit(split)
        self.n_positions = self.split.limit
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self._perm_epoch, self._perm = None, None

    def docs(self, epoch: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        idx = positions
        if self.shuffle:
            if self._perm_epoch != epoch:
                key = int(rng.mix(self.seed, epoch, rng.SALT_PERM))
                self._perm, self._perm_epoch = FeistelPermutation(self.n_positions, key), epoch
            idx = self._perm(positions)
        if isinstance(self.split, ArraySplit):
            return self.split.ids[idx], np.ones(len(idx), dtype=bool)
        return idx, self.split.contains(idx)

    def describe(self) -> list:
        return ["feistel", ROUNDS, *self.split.describe()]


class ArrayPlan:
    """The 'permutation' order: the split's ids permuted per epoch by numpy (the pinned golden order)."""

    def __init__(self, doc_ids, seed: int, shuffle: bool):
        self.doc_ids = np.asarray(doc_ids, dtype=np.int64)
        self.n_positions = len(self.doc_ids)
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self._order_epoch, self._order = None, None

    def order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            if self.shuffle:
                g = np.random.Generator(np.random.Philox(int(rng.mix(self.seed, epoch, rng.SALT_PERM))))
                self._order = self.doc_ids[g.permutation(len(self.doc_ids))]
            else:
                self._order = self.doc_ids
            self._order_epoch = epoch
        return self._order

    def docs(self, epoch: int, positions: np.ndarray) -> tuple[np.ndarray, None]:
        return self.order(epoch)[positions], None


def make_plan(epoch_order: str, doc_ids, seed: int, shuffle: bool):
    if epoch_order == "permutation":
        return ArrayPlan(doc_ids, seed, shuffle)
    if epoch_order == "feistel":
        return FeistelPlan(doc_ids, seed, shuffle)
    raise ValueError(f"epoch_order={epoch_order!r} is not valid; choose 'permutation' or 'feistel'")
