"""The deterministic, sharded, resumable, packed stream of Batches.

Order. Epoch e visits the documents of the split in a permutation drawn from (seed, e) (or in
file order with shuffle=False), held as `epoch_order` says (train/data/plan.py): 'permutation', a
numpy permutation of the split's id array (the pinned order), or 'feistel', a keyed bijection of
the document index computed per chunk of positions, with the split as a predicate (positions whose
document is not the split's yield nothing), so that no array grows with the corpus. Each document (plus EOS for flm / plm) is cut into pieces of at
most `objective.max_piece[v]` tokens, v being the document's variant (UL2 denoiser, drawn from
(seed, e, doc)). Pieces shorter than 2 tokens, empty documents and skipped bad rows are counted
in `stats`, never silently lost. Every random choice of an example (split point, noise mask) is
a function of (seed, e, doc, piece), see `train.objectives.rng`.

Packing, per *global* batch. Global batch b is planned from lengths alone, identically on every
rank: its pieces, taken in order from the cursor, go best-fit into `global_batch_size` rows
(least room left wins; ties to the lowest row), each holding at most the row shape's
`tokens_per_row` tokens in all (train/objectives/rows.py: the token budget's unit; it binds
ED:PLM's two rows of seq_length, which together may carry only seq_length). A piece that fits no row waits for the next batch
(at most `pack_lookahead` pieces wait; when that many wait, or no row has room for the smallest
example, the batch is closed). Waiting pieces open the next batch, where they always fit.
Rank r then builds and collates rows [r*B, (r+1)*B), B = global_batch_size / world_size only.

Position (`state_dict()`): {epoch, cursor (document position, piece), waiting pieces, batches
yielded, stats}: a few integers. `load_state_dict` restarts in O(1) batches (re-drawing the
epoch permutation costs O(documents) numpy work, as at any epoch start) and the stream then yields
exactly the batches an uninterrupted run would (with 'feistel', the order costs nothing to restore). The plan depends on the global batch size, not on
the world size, so a run can resume on another number of ranks at the same global batch size.
Batches never cross an epoch boundary; the last batch of an epoch may be partly padding.

Cost (issue 8). Documents are expanded into pieces with numpy, `_CHUNK_DOCS` at a time, and the
expansion is kept while the cursor is in it (waiting pieces are looked up there); the packer's loop
per piece is a bisection (decoder rows) or a few numpy ops over the G rows (encoder-decoder); the
rank's examples are made together per variant (span corruption shuffles per example, lays out for
all) and collated in one pass. tests/test_data_golden.py pins the output bit for bit.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import logging
from typing import NamedTuple

import numpy as np

from ..objectives.batch import collate
from ..objectives.core import Objective, TokenInfo, make_prompted, prompted_lengths
from ..objectives import rng
from .plan import make_plan
from .tokenize import TokenStore

log = logging.getLogger("archscale.data")
STATE_VERSION = 1
STAT_KEYS = ("documents", "pieces", "tokens", "empty_documents", "bad_rows", "skipped_short_pieces",
             "skipped_short_tokens", "truncated_examples", "truncated_tokens", "padding_tokens", "batches")
_CHUNK_DOCS = 256  # documents expanded into pieces at a time (and kept while the cursor is in them)


class Piece(NamedTuple):
    """One example to be: piece `k` of the document at position `pos` of the epoch order."""

    pos: int
    k: int
    doc: int
    start: int
    n: int
    variant: int
    word: int
    n_in: int
    n_tgt: int
    skip: str = ""  # "" | empty_documents | bad_rows | skipped_short_pieces
    need: tuple[int, int] = (0, 0)  # room it takes in a row: the objective's footprint(n_in, n_tgt)


class DataStream:
    """Iterator of this rank's Batches (dicts of tensors; see train.objectives.batch)."""

    def __init__(self, store: TokenStore, doc_ids: np.ndarray, objective: Objective, tokens: TokenInfo, *,
                 global_batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, max_epochs: int | None = None, pack_lookahead: int = 64,
                 append_eos: bool = True, target_store: TokenStore | None = None, name: str = "train",
                 epoch_order: str = "permutation"):
        for what, v, low in (("global_batch_size", global_batch_size, 1), ("world_size", world_size, 1),
                             ("rank", rank, 0), ("seed", seed, 0)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < low:
                raise ValueError(f"{what}={v!r} must be an integer >= {low}")
        if rank >= world_size:
            raise ValueError(f"rank={rank} must be < world_size={world_size}")
        if global_batch_size % world_size:
            raise ValueError(f"global_batch_size={global_batch_size} is not divisible by world_size={world_size}; "
                             f"pick a global batch that is a multiple of the number of data-parallel ranks")
        self.store, self.objective, self.tokens = store, objective, tokens
        self.target_store = target_store  # prompted data: the targets of each record
        self.epoch_order = epoch_order
        self.plan = make_plan(epoch_order, doc_ids, seed, shuffle)
        self.doc_ids = getattr(self.plan, "doc_ids", None)  # the 'permutation' order's id array
        if not (self.plan.n_positions if self.doc_ids is not None else self.plan.split.any()):
            raise ValueError(f"{name} split has no documents; add data or lower data.eval_fraction")
        self.G, self.rank, self.world = int(global_batch_size), int(rank), int(world_size)
        self.B = self.G // self.world
        self.seed, self.shuffle, self.max_epochs = int(seed), shuffle, max_epochs
        self.lookahead = max(1, min(int(pack_lookahead), self.G))
        self.eos = tokens.eos_id if (append_eos and objective.document_eos and target_store is None) else None
        self.name = name
        self.cap = np.asarray(objective.shape.capacity, dtype=np.int64)  # (2,)
        self.total = int(objective.shape.tokens_per_row)  # a row's tokens in all (ED:PLM's cap; rows.py)
        self.min_need = self._min_footprint()
        self.fingerprint = self._fingerprint()
        self._cached: _Pieces | None = None  # the expanded documents at the cursor (see _chunk)
        self.epoch, self.pos, self.k, self.waiting, self.batches = 0, 0, 0, [], 0
        self.stats = {k: 0 for k in STAT_KEYS}

    # ------------------------------------------------------------------ position
    def state_dict(self) -> dict:
        """The stream position: small, JSON-serialisable; save it with every checkpoint."""
        return {"version": STATE_VERSION, "epoch": self.epoch, "doc_pos": self.pos, "piece": self.k,
                "waiting": [list(w) for w in self.waiting], "batches": self.batches, "stats": dict(self.stats),
                "fingerprint": self.fingerprint, "global_batch_size": self.G, "world_size": self.world}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position (any rank / world size; same data, objective and seed)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"stream state version {state.get('version')!r} is not {STATE_VERSION}; it was saved "
                             f"by another archscale version")
        if state["fingerprint"] != self.fingerprint:
            raise ValueError(f"the {self.name} stream state was saved for different data / objective / seed settings "
                             f"(fingerprint {state['fingerprint']} != {self.fingerprint}); resume with the same data, "
                             f"objective and seed config, or start a new run")
        if state["global_batch_size"] != self.G:
            log.warning("resuming the %s stream with global_batch_size %d (saved with %d): the position is valid, "
                        "but batches differ from an uninterrupted run", self.name, self.G, state["global_batch_size"])
        self.epoch, self.pos, self.k = int(state["epoch"]), int(state["doc_pos"]), int(state["piece"])
        self.waiting = [tuple(int(x) for x in w) for w in state["waiting"]]
        self.batches = int(state["batches"])
        self.stats = {k: int(state["stats"].get(k, 0)) for k in STAT_KEYS}

    # ------------------------------------------------------------------ iteration
    def __iter__(self):
        return self

    def __next__(self) -> dict:
        rows = self._plan_next()
        if rows is None:
            raise StopIteration
        mine = rows[self.rank * self.B:(self.rank + 1) * self.B]
        examples = iter(self._examples([p for row in mine for p in row]))
        return collate([[next(examples) for _ in row] for row in mine], self.objective.shape, self.tokens)

    def _plan_next(self):
        """Plan the next global batch (rows of Pieces) and advance the position; None when done."""
        empty_epochs = 0
        while True:
            if self.max_epochs is not None and self.epoch >= self.max_epochs:
                return None
            rows, placed = self._pack()
            if placed:
                self.batches += 1
                self.stats["batches"] += 1
                if not self.waiting and self.pos >= self.plan.n_positions:
                    self._next_epoch()  # so that `epoch` in the state is the epoch of the next batch
                return rows
            self._next_epoch()  # nothing left in this epoch (only skipped documents)
            empty_epochs += 1
            if empty_epochs > 1:
                raise ValueError(f"{self.name} split yields no usable example for objective "
                                 f"{self.objective.name!r} (stats {self.stats}); every document is empty or shorter "
                                 f"than 2 tokens")

    def _next_epoch(self) -> None:
        log.info("%s stream: epoch %d done; %s", self.name, self.epoch, self.stats)
        self.epoch, self.pos, self.k = self.epoch + 1, 0, 0

    def _pack(self):
        G = self.G
        fit = _BEST_FIT[self.objective.shape.packed_dims](G, self.cap, self.min_need, self.total)
        rows: list[list[Piece]] = [[] for _ in range(G)]
        placed = 0
        waiting_now = self._pieces_at(self.waiting)
        self.waiting = []
        new_waiting: list[Piece] = []
        closed = False
        for p in self._candidates(waiting_now):
            if p.skip:
                self.stats[p.skip] += 1
                if p.skip == "skipped_short_pieces":
                    self.stats["skipped_short_tokens"] += p.n
                continue
            r = fit.place(*p.need)
            if r >= 0:
                rows[r].append(p)
                placed += 1
                self._account(p)
            else:
                new_waiting.append(p)
                if len(new_waiting) >= self.lookahead:
                    closed = True
            if closed or not fit.open_rows:
                break
        self.waiting = [(p.pos, p.k) for p in new_waiting]
        if placed:
            self.stats["padding_tokens"] += fit.padding()
        return rows, placed

    def _account(self, p: Piece) -> None:
        self.stats["pieces"] += 1
        self.stats["tokens"] += p.n_in + p.n_tgt
        if p.k == 0:
            self.stats["documents"] += 1

    def _candidates(self, first: list[Piece]):
        """Waiting pieces, then pieces from the cursor on; the cursor advances as they are taken."""
        yield from first
        while self.pos < self.plan.n_positions:
            chunk = self._chunk()
            for j in range(chunk.find(self.pos, self.k), len(chunk)):
                p = chunk.piece(j)
                # p is consumed once taken: advance the cursor past it first
                self.pos, self.k = (p.pos + 1, 0) if chunk.last[j] else (p.pos, p.k + 1)
                if chunk.truncated[j] > 0 and not p.skip:
                    self.stats["truncated_examples"] += 1
                    self.stats["truncated_tokens"] += chunk.truncated[j]
                yield p
            if self.pos < chunk.hi:  # feistel: the chunk's last positions hold other-split documents
                self.pos, self.k = chunk.hi, 0

    def _chunk(self) -> "_Pieces":
        """The expanded documents around the cursor: _CHUNK_DOCS epoch positions from it, kept until
        the cursor leaves them (an expansion depends only on (seed, epoch, position), not on where a
        chunk starts, so reusing one across batches changes nothing)."""
        c = self._cached
        if c is None or c.epoch != self.epoch or not c.lo <= self.pos < c.hi:
            hi = min(self.pos + _CHUNK_DOCS, self.plan.n_positions)
            c = self._cached = self._expand(np.arange(self.pos, hi, dtype=np.int64))
            c.epoch, c.lo, c.hi = self.epoch, self.pos, hi
        return c

    # ------------------------------------------------------------------ pieces
    def _expand(self, positions: np.ndarray) -> "_Pieces":
        """Pieces of the documents at the (increasing) epoch positions `positions`, in order (none
        for a position whose document is not the split's: the feistel order's predicate)."""
        docs, kept = self.plan.docs(self.epoch, positions)  # (D,)
        if kept is not None and not kept.all():
            positions, docs = positions[kept], docs[kept]
        raw = self.store.lengths[docs]  # (D,) -1 = bad row
        obj = self.objective
        if self.target_store is not None:  # prompted: one example per record, truncated to fit
            tgt = self.target_store.lengths[docs]
            n_in, n_tgt = prompted_lengths(obj, raw, tgt)
            zeros = np.zeros(len(docs), dtype=np.int64)
            skip = np.where(raw > 0, _SKIP_NONE, _SKIP_EMPTY)
            return self._pieces(positions, zeros, docs, zeros, raw, zeros, zeros.astype(np.uint64), n_in, n_tgt, skip,
                                np.ones(len(docs), dtype=bool), raw + tgt - n_in - n_tgt)
        n_doc = raw + (raw > 0) * (self.eos is not None)  # (D,) with EOS
        variants = obj.choose_variant(rng.mix(self.seed, self.epoch, docs, rng.SALT_DOC))  # (D,)
        P = obj.max_piece[variants]  # (D,)
        n_pieces = np.where(n_doc > 0, -(-n_doc // P), 1)  # (D,) empty / bad rows: one skip marker
        idx = np.repeat(np.arange(len(docs)), n_pieces)  # (M,) document of each piece
        k = np.arange(len(idx)) - np.repeat(np.cumsum(n_pieces) - n_pieces, n_pieces)  # (M,) piece index
        start = k * P[idx]
        n = np.minimum(P[idx], n_doc[idx] - start)
        words = rng.mix(self.seed, self.epoch, docs[idx], k, rng.SALT_PIECE)
        n_in, n_tgt = obj.lengths(np.maximum(n, obj.min_piece), variants[idx], words)
        raw_i = raw[idx]
        skip = np.select([raw_i < 0, raw_i == 0, n < obj.min_piece], [_SKIP_BAD, _SKIP_EMPTY, _SKIP_SHORT], _SKIP_NONE)
        return self._pieces(positions[idx], k, docs[idx], start, n, variants[idx], words, n_in, n_tgt, skip,
                            k == n_pieces[idx] - 1, np.zeros(len(idx), dtype=np.int64))

    def _pieces(self, pos, k, doc, start, n, variant, word, n_in, n_tgt, skip, last, truncated) -> "_Pieces":
        need_a, need_b = self.objective.shape.footprint(n_in, n_tgt)
        return _Pieces(pos, k, doc, start, n, variant, word, n_in, n_tgt, skip, last, truncated,
                       np.broadcast_to(need_a, pos.shape), np.broadcast_to(need_b, pos.shape))

    def _pieces_at(self, keys: list[tuple[int, int]]) -> list[Piece]:
        """The pieces (pos, k) of `keys` (the waiting ones), expanded together."""
        if not keys:
            return []
        chunk = self._cached  # waiting pieces were usually taken from the documents at the cursor
        if chunk is None or chunk.epoch != self.epoch or not all(chunk.lo <= pos < chunk.hi for pos, _ in keys):
            chunk = self._expand(np.unique(np.fromiter((pos for pos, _ in keys), dtype=np.int64, count=len(keys))))
        out = []
        for pos, k in keys:
            j = chunk.find(pos, k)
            if j >= len(chunk) or chunk.pos[j] != pos or chunk.k[j] != k:
                raise ValueError(f"saved stream position refers to piece {k} of document position {pos}, which does "
                                 f"not exist; the state does not belong to this data")
            out.append(chunk.piece(j))
        return out

    def _examples(self, pieces: list[Piece]) -> list:
        """The Examples of `pieces` (this rank's rows, flattened), made together per variant."""
        if self.target_store is not None:
            return [make_prompted(self.objective, self.store.tokens(p.doc), self.target_store.tokens(p.doc))
                    for p in pieces]
        tokens = [self.store.piece(p.doc, p.start, p.n, self.eos) for p in pieces]
        return self.objective.make_many(tokens, [p.variant for p in pieces], [p.word for p in pieces])

    def _min_footprint(self) -> np.ndarray:
        """The smallest room any example can need (a 2-token piece): rows with less are full."""
        obj = self.objective
        if self.target_store is not None:  # a prompted record of one input and one target token
            inp, tgt = np.ones(1, np.int64), np.ones(1, np.int64)
        else:
            n = np.full(len(obj.variants), obj.min_piece)
            inp, tgt = obj.lengths(n, np.arange(len(obj.variants)), np.zeros(len(n), np.uint64))
        a, b = obj.shape.footprint(inp, tgt)
        return np.array([int(np.min(a)), int(np.min(b))])

    def _fingerprint(self) -> str:
        if self.doc_ids is None:  # feistel: the plan describes the split and the order
            desc = json.dumps([self.store.fingerprint, self.store.num_docs, self.plan.describe(),
                               self.objective.describe(), self.seed, self.shuffle, self.eos, self.lookahead,
                               self.tokens.vocab_size])
            return hashlib.sha256(desc.encode()).hexdigest()[:16]
        desc = json.dumps([self.store.fingerprint, self.store.num_docs, int(len(self.doc_ids)),
                           int(self.doc_ids[:64].sum()), self.objective.describe(), self.seed, self.shuffle,
                           self.eos, self.lookahead, self.tokens.vocab_size])
        return hashlib.sha256(desc.encode()).hexdigest()[:16]


class _BestFit2D:
    """Best fit of (a, b) footprints into G rows of room `cap` (2,) and `total` tokens in all: the
    row with the least total room left after placing among those where it fits, ties to the lowest
    row. `open_rows` counts rows that still take the smallest example (`min_need`). When `total` is
    cap_a + cap_b (every shape but ED:PLM's) the total room is room_a + room_b and binds nothing."""

    def __init__(self, G: int, cap, min_need, total: int):
        self.cap_a, self.cap_b = (int(c) for c in cap)
        self.min_a, self.min_b = (int(c) for c in min_need)
        self.room_a = np.full(G, self.cap_a, dtype=np.int64)  # (G,)
        self.room_b = np.full(G, self.cap_b, dtype=np.int64)  # (G,)
        self.room_t = np.full(G, min(int(total), self.cap_a + self.cap_b), dtype=np.int64)  # (G,) both sides
        self.open_rows = G if self._open(self.cap_a, self.cap_b, int(self.room_t[0])) else 0
        self.never = np.iinfo(np.int64).max

    def _open(self, room_a: int, room_b: int, room_t: int) -> bool:
        return room_a >= self.min_a and room_b >= self.min_b and room_t >= self.min_a + self.min_b

    def place(self, a: int, b: int) -> int:
        """The row the example goes to (its room taken), or -1 if it fits no row."""
        ok = (self.room_a >= a) & (self.room_b >= b) & (self.room_t >= a + b)  # (G,)
        if not ok.any():
            return -1
        r = int(np.argmin(np.where(ok, self.room_t, self.never)))
        was_open = self._open(self.room_a[r], self.room_b[r], self.room_t[r])
        self.room_a[r] -= a
        self.room_b[r] -= b
        self.room_t[r] -= a + b
        if was_open and not self._open(self.room_a[r], self.room_b[r], self.room_t[r]):
            self.open_rows -= 1  # rows only shrink: once full, full for this batch
        return r

    def padding(self) -> int:
        """Slots left empty in both rows (what the model computes on padding)."""
        return int(self.room_a.sum() + self.room_b.sum())


class _BestFit1D:
    """_BestFit2D for decoder rows (room and footprint (a, 0)): the rows kept sorted by (room, row),
    so the best fit is a bisection instead of a pass over all rows; the same choices."""

    def __init__(self, G: int, cap, min_need, total: int):
        self.cap, self.min = int(cap[0]), int(min_need[0])  # a decoder row's total is its length
        self.rows = [(self.cap, r) for r in range(G)]  # sorted by (room, row)
        self.open_rows = G if self.cap >= self.min else 0

    def place(self, a: int, b: int) -> int:
        i = bisect.bisect_left(self.rows, (a, -1))  # least room >= a, lowest row among equals
        if i == len(self.rows):
            return -1
        room, r = self.rows.pop(i)
        bisect.insort(self.rows, (room - a, r))
        if room >= self.min > room - a:
            self.open_rows -= 1
        return r

    def padding(self) -> int:
        return sum(room for room, _ in self.rows)


_SKIP_NONE, _SKIP_BAD, _SKIP_EMPTY, _SKIP_SHORT = range(4)
_SKIP_NAMES = ("", "bad_rows", "empty_documents", "skipped_short_pieces")


class _Pieces:
    """Expanded documents: one entry per piece, in (pos, k) order, as columns (numpy for the
    vectorised work, Python lists for the packer's per-piece loop)."""

    def __init__(self, pos, k, doc, start, n, variant, word, n_in, n_tgt, skip, last, truncated, need_a, need_b):
        self.pos_array = np.asarray(pos, dtype=np.int64)  # (M,) sorted: the lookup key
        self.pos, self.k, self.doc, self.start, self.n = (np.asarray(c).tolist() for c in (pos, k, doc, start, n))
        self.variant, self.word, self.n_in, self.n_tgt = (np.asarray(c).tolist() for c in (variant, word, n_in, n_tgt))
        self.skip, self.last, self.truncated = (np.asarray(c).tolist() for c in (skip, last, truncated))
        self.need_a, self.need_b = np.asarray(need_a).tolist(), np.asarray(need_b).tolist()
        self.epoch, self.lo, self.hi = -1, 0, 0  # set by DataStream._chunk

    def __len__(self) -> int:
        return len(self.pos)

    def find(self, pos: int, k: int) -> int:
        """Index of the first piece at or after (pos, k)."""
        first = int(np.searchsorted(self.pos_array, pos, side="left"))
        end = int(np.searchsorted(self.pos_array, pos, side="right"))
        return min(first + k, end)

    def piece(self, j: int) -> Piece:
        return Piece(self.pos[j], self.k[j], self.doc[j], self.start[j], self.n[j], self.variant[j], self.word[j],
                     self.n_in[j], self.n_tgt[j], _SKIP_NAMES[self.skip[j]], (self.need_a[j], self.need_b[j]))


_BEST_FIT = {1: _BestFit1D, 2: _BestFit2D}  # by RowShape.packed_dims: one length per row, or two (ED)
