"""prepare() and build_stream(): the data pipeline's entry points (see train/data/__init__.py)."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .. import registry
from ..objectives import ObjectiveConfig, TokenInfo, build_objective
from .config import DataConfig
from .corpus import embedded_files, expand_files, load_corpus
from .multitask import load_multitask, rank_classification_examples, read_records, validate_record
from .plan import HeldOutRule
from .prefetch import Prefetcher
from .stream import STAT_KEYS, DataStream
from .tokenize import MappedTokenStore, TokenStore, tokenize_dataset, tokenize_prompted
from .tokenizer import load_tokenizer

log = logging.getLogger("archscale.data")


@dataclass
class Split:
    """A split: the store of tokenized documents and which of them belong to the split."""

    store: TokenStore
    doc_ids: np.ndarray  # (D,) int64 indices into store (data.epoch_order=feistel: a plan.HashSplit predicate)
    target_store: TokenStore | None = None  # prompted data: targets


@dataclass
class PreparedData:
    """What `prepare` returns: the tokenizer, its token ids, and the tokenized splits."""

    tokenizer: object
    tokens: TokenInfo
    train: Split
    eval: Split | None
    prompted: bool


def prepare(cfg: DataConfig, objective: ObjectiveConfig | None = None) -> PreparedData:
    """Load, validate and tokenize the data (cached: the second call, or another rank, is fast)."""
    cfg.validate()
    prompted = cfg.format == "multitask"
    if objective is not None and (objective.name == "prompted") != prompted:
        raise ValueError(f"objective.name={objective.name!r} and data.format={cfg.format!r} do not go together: "
                         f"objective 'prompted' reads data.format='multitask' files, the others read documents")
    tok, tokens = load_tokenizer(cfg)
    if prompted:
        cache = cfg.resolved_cache_dir()
        splits = []
        for files, what in ((cfg.train_files, "train_files"), (cfg.eval_files, "eval_files")):
            if not files:
                splits.append(None)
                continue
            ds = tokenize_prompted(load_multitask(expand_files(files, what), cache), tok, cfg, what)
            ids, tgt = TokenStore(ds, "input_ids", "length"), TokenStore(ds, "target_ids", "target_length")
            splits.append(Split(ids, _first(np.arange(ids.num_docs), cfg.max_documents), tgt))
        return PreparedData(tok, tokens, splits[0], splits[1], True)
    train_ds, eval_ds, held = load_corpus(cfg, lazy_split=cfg.epoch_order == "feistel")
    what = "embedded corpus" if cfg.source == "embedded" else "train data"
    train, ev = split_documents(tokenize_dataset(train_ds, tok, cfg, what), held, cfg)
    if held is None:
        ev = split_documents(tokenize_dataset(eval_ds, tok, cfg, "eval data"), None, cfg)[0]
    return PreparedData(tok, tokens, train, ev, False)


def split_documents(ds, held, cfg: DataConfig) -> tuple[Split, Split | None]:
    """(train, held-out) splits of a tokenized dataset; `held` is load_corpus's mask (a HeldOutRule
    with data.epoch_order=feistel) or None (all documents train, no held-out split)."""
    if cfg.epoch_order == "feistel":  # no array per document (train/data/plan.py)
        store = MappedTokenStore(ds)
        rule = held if held is not None else HeldOutRule(store.num_docs, 0.0)
        ev = Split(store, rule.split(True, cfg.max_documents)) if held is not None and rule.any() else None
        return Split(store, rule.split(False, cfg.max_documents)), ev
    store = TokenStore(ds)
    if held is None:
        return Split(store, _first(np.arange(store.num_docs), cfg.max_documents)), None
    idx = np.arange(store.num_docs)
    ev = Split(store, _first(idx[held], cfg.max_documents)) if held.any() else None
    return Split(store, _first(idx[~held], cfg.max_documents)), ev


def _first(ids: np.ndarray, n: int) -> np.ndarray:
    return ids[:n] if n else ids


def build_stream(prepared: PreparedData, objective: ObjectiveConfig, arch: str, *, global_batch_size: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, split: str = "train",
                 data: DataConfig | None = None, prefetch: int = 0) -> DataStream | Prefetcher:
    """This rank's stream of Batches for (objective, arch) over a split ('train': endless epochs,
    shuffled per data.shuffle; 'eval': one pass in file order). `prefetch` > 0: that many batches
    made ahead in a background thread (train.data.prefetch.Prefetcher; the same batches and
    positions); the trainer passes data.prefetch for its training stream."""
    data = data or DataConfig()
    if not isinstance(prefetch, int) or isinstance(prefetch, bool) or prefetch < 0:
        raise ValueError(f"prefetch={prefetch!r} must be an integer >= 0 (batches made ahead; 0 = off)")
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r} is not valid; choose 'train' or 'eval'")
    sp = prepared.train if split == "train" else prepared.eval
    if sp is None:
        raise ValueError("there is no eval split: set data.eval_files, data.hub_eval_split or data.eval_fraction > 0")
    if (objective.name == "prompted") != prepared.prompted:
        raise ValueError(f"objective {objective.name!r} does not match the prepared data "
                         f"({'prompted multitask' if prepared.prompted else 'documents'})")
    obj = build_objective(objective, registry.get(arch), prepared.tokens)
    train = split == "train"
    stream = DataStream(sp.store, sp.doc_ids, obj, prepared.tokens, global_batch_size=global_batch_size, rank=rank,
                        world_size=world_size, seed=seed, shuffle=data.shuffle and train,
                        max_epochs=None if train else 1, pack_lookahead=data.pack_lookahead,
                        append_eos=data.append_eos, target_store=sp.target_store, name=split,
                        epoch_order=data.epoch_order)
    return Prefetcher(stream, prefetch) if prefetch else stream


