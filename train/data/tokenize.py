"""Tokenization (parallel, cached in shards, resumable: train/data/shards.py), and zero-copy access to the result.

The tokenized dataset has `input_ids` (list of int32) and `length` (int32; -1 marks a row whose
text field was missing / null when data.bad_rows='skip'). For prompted multitask data it has
`input_ids` / `target_ids` / `length` / `target_length`. The cache is keyed by the source
dataset's fingerprint and the tokenizer's fingerprint, so a second run (or another rank) reuses it,
and a killed tokenization resumes from the shards already written.
`TokenStore` reads the token ids straight from the Arrow buffers (memory-mapped cache files):
fetching a piece of a document is a numpy slice, whatever the corpus size.
"""
from __future__ import annotations

import hashlib
import logging

import numpy as np

from .config import DataConfig
from .tokenizer import tokenizer_fingerprint

log = logging.getLogger("archscale.data")
TOKENIZE_VERSION = 1


def _tokenize_texts(tok, texts):
    """Token ids of texts; special-token strings inside raw text are split, never turned into control tokens."""
    return tok(texts, add_special_tokens=False, return_attention_mask=False, split_special_tokens=True)["input_ids"]


class _TextRows:
    """fn(batch, indices) -> input_ids / length of a document batch. A module-level class, not a
    closure, so that it pickles to the tokenization pool's workers (train/data/shards.py starts them
    clean, never by forking this process). FINGERPRINT names it in the cache key: kept as the closure's
    old qualified name, so caches written before stay valid."""
    FINGERPRINT = "tokenize_dataset.<locals>.fn"

    def __init__(self, tok, field: str, skip: bool, what: str):
        self.tok, self.field, self.skip, self.what = tok, field, skip, what

    def __call__(self, batch, indices):
        texts = batch[self.field]
        ok = [isinstance(t, str) for t in texts]
        if not all(ok):
            bad = indices[ok.index(False)]
            if not self.skip:
                raise ValueError(f"{self.what}: row {bad} has no {self.field!r} text (missing or null); fix the data, "
                                 f"set data.text_field, or set data.bad_rows='skip' to count and skip such rows")
        ids = _tokenize_texts(self.tok, [t if o else "" for t, o in zip(texts, ok)])
        return {"input_ids": ids, "length": [len(x) if o else -1 for x, o in zip(ids, ok)]}


class _PromptedRows:
    """fn(batch, indices) -> input_ids / target_ids (EOS-terminated) and their lengths (as _TextRows)."""
    FINGERPRINT = "tokenize_prompted.<locals>.fn"

    def __init__(self, tok):
        self.tok = tok

    def __call__(self, batch, indices):
        inp = _tokenize_texts(self.tok, batch["input"])
        tgt = [t + [self.tok.eos_token_id] for t in _tokenize_texts(self.tok, batch["target"])]
        return {"input_ids": inp, "target_ids": tgt, "length": [len(x) for x in inp],
                "target_length": [len(x) for x in tgt]}


def tokenize_dataset(ds, tok, cfg: DataConfig, what: str = "data", shard_range=None):
    """Tokenize a document dataset (column data.text_field) into input_ids / length, cached in
    shards; `shard_range` (A, B): only those shards (a job-array task; returns None)."""
    import datasets

    field = cfg.text_field
    if field not in ds.column_names:
        raise ValueError(f"{what}: no column {field!r} in the data (columns: {ds.column_names}); set data.text_field")
    fn = _TextRows(tok, field, cfg.bad_rows == "skip", what)
    features = datasets.Features({"input_ids": datasets.List(datasets.Value("int32")),
                                  "length": datasets.Value("int32")})
    return _map(ds, fn, features, tok, cfg, [field], what, shard_range)


def tokenize_prompted(ds, tok, cfg: DataConfig, what: str = "data", shard_range=None):
    """Tokenize validated prompted records (input / target) into input_ids / target_ids, cached."""
    import datasets

    fn = _PromptedRows(tok)
    features = datasets.Features({"input_ids": datasets.List(datasets.Value("int32")),
                                  "target_ids": datasets.List(datasets.Value("int32")),
                                  "length": datasets.Value("int32"), "target_length": datasets.Value("int32")})
    return _map(ds, fn, features, tok, cfg, ["input", "target"], what, shard_range)


def _map(ds, fn, features, tok, cfg: DataConfig, fields, what, shard_range=None):
    """ds tokenized by fn in shards (train/data/shards.py: parallel, cached, resumable)."""
    from . import shards

    # the tokens' identity: unchanged by the sharding (a checkpoint's stream fingerprint stays valid)
    fp = hashlib.sha256(f"{TOKENIZE_VERSION}|{ds._fingerprint}|{tokenizer_fingerprint(tok)}|{fields}|"
                        f"{cfg.bad_rows}|{fn.FINGERPRINT}".encode()).hexdigest()[:16]
    out, dt, tokenized = shards.run(ds, fn, features, fields, fp, cfg, what, shard_range)
    if out is None:
        return None
    n = int(np.maximum(out.data.table.column("length").to_numpy(), 0).sum())
    log.info("%s: %d documents, %d tokens (%.1fs%s)", what, len(out), n, dt,
             f", {n / dt:,.0f} tokens/s" if tokenized and dt > 0.5 else ", cached" if not tokenized else "")
    return out


class TokenStore:
    """Random access to tokenized documents without copying: doc i -> np.ndarray of its ids."""

    def __init__(self, ds, ids_column: str = "input_ids", length_column: str = "length"):
        if getattr(ds, "_indices", None) is not None:
            ds = ds.flatten_indices()
        table = ds.data.table
        self.lengths = np.asarray(table.column(length_column).to_numpy(), dtype=np.int64)  # (N,) -1 = bad row
        self.num_docs = len(self.lengths)
        self._chunks = []  # (values, offsets) per Arrow chunk, zero-copy views
        starts = [0]
        for chunk in table.column(ids_column).chunks:
            offsets = chunk.offsets.to_numpy()
            values = chunk.flatten().to_numpy(zero_copy_only=False)  # respects a sliced chunk
            self._chunks.append((values, offsets - offsets[0]))
            starts.append(starts[-1] + len(chunk))
        self._chunk_starts = np.asarray(starts, dtype=np.int64)
        self.fingerprint = getattr(ds, "_fingerprint", "") or ""

    def tokens(self, i: int) -> np.ndarray:
        c = int(np.searchsorted(self._chunk_starts, i, side="right")) - 1
        values, offsets = self._chunks[c]
        j = i - int(self._chunk_starts[c])
        return values[offsets[j]:offsets[j + 1]]

    def piece(self, i: int, start: int, n: int, eos_id: int | None) -> np.ndarray:
        """Tokens [start, start+n) of document i, where the document is followed by eos_id (if given)."""
        toks = self.tokens(i)
        out = np.asarray(toks[start:start + n], dtype=np.int64)
        if eos_id is not None and len(out) < n:  # the piece runs into the document's EOS
            out = np.concatenate([out, np.array([eos_id], dtype=np.int64)])
        return out


class ChunkedLengths:
    """The length column as zero-copy int32 views per Arrow chunk; `self[docs]` -> int64 lengths."""

    def __init__(self, column):
        self._views = [c.to_numpy(zero_copy_only=True) for c in column.chunks]
        self._starts = np.cumsum([0] + [len(v) for v in self._views]).astype(np.int64)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, docs):
        if isinstance(docs, (int, np.integer)):
            c = int(np.searchsorted(self._starts, docs, side="right")) - 1
            return int(self._views[c][docs - self._starts[c]])
        docs = np.asarray(docs, dtype=np.int64)
        if len(self._views) == 1:
            return self._views[0][docs].astype(np.int64)
        c = np.searchsorted(self._starts, docs, side="right") - 1
        out = np.empty(docs.shape, dtype=np.int64)
        for ci in np.unique(c).tolist():
            sel = c == ci
            out[sel] = self._views[ci][docs[sel] - self._starts[ci]]
        return out

    def __array__(self, dtype=None, copy=None):
        out = np.concatenate(self._views).astype(np.int64) if self._views else np.zeros(0, np.int64)
        return out if dtype is None else out.astype(dtype)

    def sum(self) -> int:
        return int(sum(int(v.sum(dtype=np.int64)) for v in self._views))


class MappedTokenStore(TokenStore):
    """TokenStore without per-document copies: lengths and offsets are views of the mapped columns."""

    def __init__(self, ds, ids_column: str = "input_ids", length_column: str = "length"):
        if getattr(ds, "_indices", None) is not None:
            ds = ds.flatten_indices()
        table = ds.data.table
        self.lengths = ChunkedLengths(table.column(length_column))  # -1 = bad row
        self.num_docs = len(self.lengths)
        self._chunks = []  # (values, offsets, offsets[0]) per Arrow chunk, zero-copy views
        starts = [0]
        for chunk in table.column(ids_column).chunks:
            offsets = chunk.offsets.to_numpy(zero_copy_only=False)
            self._chunks.append((chunk.flatten().to_numpy(zero_copy_only=False), offsets, int(offsets[0])))
            starts.append(starts[-1] + len(chunk))
        self._chunk_starts = np.asarray(starts, dtype=np.int64)
        self.fingerprint = getattr(ds, "_fingerprint", "") or ""

    def tokens(self, i: int) -> np.ndarray:
        c = int(np.searchsorted(self._chunk_starts, i, side="right")) - 1
        values, offsets, base = self._chunks[c]
        j = i - int(self._chunk_starts[c])
        return values[int(offsets[j]) - base:int(offsets[j + 1]) - base]
