"""The deterministic, sharded, resumable, packed stream of Batches.

Order. Epoch e visits the documents of the split in a permutation drawn from (seed, e) (or in
file order with shuffle=False). Each document (plus EOS for flm / plm) is cut into pieces of at
most `objective.max_piece[v]` tokens, v being the document's variant (UL2 denoiser, drawn from
(seed, e, doc)). Pieces shorter than 2 tokens, empty documents and skipped bad rows are counted
in `stats`, never silently lost. Every random choice of an example (split point, noise mask) is
a function of (seed, e, doc, piece), see `train.objectives.rng`.

Packing, per *global* batch. Global batch b is planned from lengths alone, identically on every
rank: its pieces, taken in order from the cursor, go best-fit into `global_batch_size` rows
(least room left wins; ties to the lowest row). A piece that fits no row waits for the next batch
(at most `pack_lookahead` pieces wait; when that many wait, or no row has room for the smallest
example, the batch is closed). Waiting pieces open the next batch, where they always fit.
Rank r then builds and collates rows [r*B, (r+1)*B), B = global_batch_size / world_size only.

Position (`state_dict()`): {epoch, cursor (document position, piece), waiting pieces, batches
yielded, stats}: a few integers. `load_state_dict` restarts in O(1) batches (re-drawing the
epoch permutation costs O(documents) numpy work, as at any epoch start) and the stream then yields
exactly the batches an uninterrupted run would. The plan depends on the global batch size, not on
the world size, so a run can resume on another number of ranks at the same global batch size.
Batches never cross an epoch boundary; the last batch of an epoch may be partly padding.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

import numpy as np

from ..objectives.batch import collate
from ..objectives.core import Objective, TokenInfo, make_prompted, prompted_lengths
from ..objectives import rng
from .tokenize import TokenStore

log = logging.getLogger("archscale.data")
STATE_VERSION = 1
STAT_KEYS = ("documents", "pieces", "tokens", "empty_documents", "bad_rows", "skipped_short_pieces",
             "skipped_short_tokens", "truncated_examples", "truncated_tokens", "padding_tokens", "batches")
_CHUNK_DOCS = 256  # documents expanded into pieces at a time


@dataclass(frozen=True)
class Piece:
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


class DataStream:
    """Iterator of this rank's Batches (dicts of tensors; see train.objectives.batch)."""

    def __init__(self, store: TokenStore, doc_ids: np.ndarray, objective: Objective, tokens: TokenInfo, *,
                 global_batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, max_epochs: int | None = None, pack_lookahead: int = 64,
                 append_eos: bool = True, target_store: TokenStore | None = None, name: str = "train"):
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
        self.doc_ids = np.asarray(doc_ids, dtype=np.int64)
        if len(self.doc_ids) == 0:
            raise ValueError(f"{name} split has no documents; add data or lower data.eval_fraction")
        self.G, self.rank, self.world = int(global_batch_size), int(rank), int(world_size)
        self.B = self.G // self.world
        self.seed, self.shuffle, self.max_epochs = int(seed), shuffle, max_epochs
        self.lookahead = max(1, min(int(pack_lookahead), self.G))
        self.eos = tokens.eos_id if (append_eos and objective.document_eos and target_store is None) else None
        self.name = name
        self.cap = np.asarray(objective.shape.capacity, dtype=np.int64)  # (2,)
        self.min_need = self._min_footprint()
        self.fingerprint = self._fingerprint()
        self._order_epoch, self._order = None, None
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
        return collate([[self._example(p) for p in row] for row in mine], self.objective.shape, self.tokens)

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
                if not self.waiting and self.pos >= len(self._epoch_order()):
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
        G, cap = self.G, self.cap
        room = np.tile(cap, (G, 1))  # (G, 2) room left per row
        rows: list[list[Piece]] = [[] for _ in range(G)]
        placed = 0
        waiting_now = [self._piece_at(pos, k) for pos, k in self.waiting]
        self.waiting = []
        new_waiting: list[Piece] = []
        closed = False
        for p in self._candidates(waiting_now):
            if p.skip:
                self.stats[p.skip] += 1
                if p.skip == "skipped_short_pieces":
                    self.stats["skipped_short_tokens"] += p.n
                continue
            need = np.asarray(self.objective.shape.footprint(p.n_in, p.n_tgt), dtype=np.int64)  # (2,)
            left = room - need  # (G, 2)
            ok = (left >= 0).all(axis=1)
            if ok.any():
                r = int(np.argmin(np.where(ok, left.sum(axis=1), np.iinfo(np.int64).max)))
                room[r] = left[r]
                rows[r].append(p)
                placed += 1
                self._account(p)
            else:
                new_waiting.append(p)
                if len(new_waiting) >= self.lookahead:
                    closed = True
            if closed or not (room >= self.min_need).all(axis=1).any():
                break
        self.waiting = [(p.pos, p.k) for p in new_waiting]
        if placed:
            self.stats["padding_tokens"] += int(room.sum())
        return rows, placed

    def _account(self, p: Piece) -> None:
        self.stats["pieces"] += 1
        self.stats["tokens"] += p.n_in + p.n_tgt
        if p.k == 0:
            self.stats["documents"] += 1

    def _candidates(self, first: list[Piece]):
        """Waiting pieces, then pieces from the cursor on; the cursor advances as they are taken."""
        yield from first
        order = self._epoch_order()
        while self.pos < len(order):
            for item in self._expand(self.pos, min(self.pos + _CHUNK_DOCS, len(order))):
                p = item.piece
                if (p.pos, p.k) < (self.pos, self.k):
                    continue  # already consumed (resumed inside a document)
                # p is consumed once taken: advance the cursor past it first
                self.pos, self.k = (p.pos + 1, 0) if item.last else (p.pos, p.k + 1)
                if item.truncated > 0 and not p.skip:
                    self.stats["truncated_examples"] += 1
                    self.stats["truncated_tokens"] += item.truncated
                yield p

    # ------------------------------------------------------------------ pieces
    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            if self.shuffle:
                g = np.random.Generator(np.random.Philox(int(rng.mix(self.seed, self.epoch, rng.SALT_PERM))))
                self._order = self.doc_ids[g.permutation(len(self.doc_ids))]
            else:
                self._order = self.doc_ids
            self._order_epoch = self.epoch
        return self._order

    def _expand(self, lo: int, hi: int):
        """Pieces of the documents at epoch positions [lo, hi), in order."""
        order = self._epoch_order()
        docs = order[lo:hi]
        raw = self.store.lengths[docs]  # (D,) -1 = bad row
        out = []
        if self.target_store is not None:  # prompted: one example per record, truncated to fit
            tgt = self.target_store.lengths[docs]
            n_in, n_tgt = prompted_lengths(self.objective, raw, tgt)
            for i, d in enumerate(docs):
                skip = "" if raw[i] > 0 else "empty_documents"
                trunc = int(raw[i] + tgt[i] - n_in[i] - n_tgt[i])
                p = Piece(lo + i, 0, int(d), 0, int(raw[i]), 0, 0, int(n_in[i]), int(n_tgt[i]), skip)
                out.append(_Item(p, True, trunc))
            return out
        n_doc = raw + (raw > 0) * (self.eos is not None)  # (D,) with EOS
        variants = self.objective.choose_variant(rng.mix(self.seed, self.epoch, docs, rng.SALT_DOC))  # (D,)
        P = self.objective.max_piece[variants]  # (D,)
        n_pieces = np.where(n_doc > 0, -(-n_doc // P), 1)  # (D,) empty / bad rows: one skip marker
        idx = np.repeat(np.arange(len(docs)), n_pieces)  # (M,) document of each piece
        k = np.arange(len(idx)) - np.repeat(np.cumsum(n_pieces) - n_pieces, n_pieces)  # (M,) piece index
        start = k * P[idx]
        n = np.minimum(P[idx], n_doc[idx] - start)
        words = rng.mix(self.seed, self.epoch, docs[idx], k, rng.SALT_PIECE)
        n_in, n_tgt = self.objective.lengths(np.maximum(n, self.objective.min_piece), variants[idx], words)
        last = k == n_pieces[idx] - 1
        for j in range(len(idx)):
            i = idx[j]
            skip = ("bad_rows" if raw[i] < 0 else "empty_documents" if raw[i] == 0
                    else "skipped_short_pieces" if n[j] < self.objective.min_piece else "")
            out.append(_Item(Piece(lo + int(i), int(k[j]), int(docs[i]), int(start[j]), int(n[j]), int(variants[i]),
                                   int(words[j]), int(n_in[j]), int(n_tgt[j]), skip), bool(last[j]), 0))
        return out

    def _piece_at(self, pos: int, k: int) -> Piece:
        for item in self._expand(pos, pos + 1):
            if item.piece.k == k:
                return item.piece
        raise ValueError(f"saved stream position refers to piece {k} of document position {pos}, which does not "
                         f"exist; the state does not belong to this data")

    def _example(self, p: Piece):
        if self.target_store is not None:
            return make_prompted(self.objective, self.store.tokens(p.doc), self.target_store.tokens(p.doc))
        return self.objective.make(self.store.piece(p.doc, p.start, p.n, self.eos), p.variant, p.word)

    def _min_footprint(self) -> np.ndarray:
        """The smallest room any example can need (a 2-token piece): rows with less are full."""
        if self.target_store is not None:
            return np.array([2, 0] if self.objective.shape.family == "decoder" else [1, 1])
        obj = self.objective
        n = np.full(len(obj.variants), obj.min_piece)
        inp, tgt = obj.lengths(n, np.arange(len(obj.variants)), np.zeros(len(n), np.uint64))
        if obj.shape.family == "decoder":
            return np.array([int((inp + tgt).min()), 0])
        return np.array([int(inp.min()), int(tgt.min())])

    def _fingerprint(self) -> str:
        desc = json.dumps([self.store.fingerprint, self.store.num_docs, int(len(self.doc_ids)),
                           int(self.doc_ids[:64].sum()), self.objective.describe(), self.seed, self.shuffle,
                           self.eos, self.lookahead, self.tokens.vocab_size])
        return hashlib.sha256(desc.encode()).hexdigest()[:16]


@dataclass
class _Item:
    piece: Piece
    last: bool
    truncated: int
