"""Data: read (datasets), tokenize (cached), cut, pack, shard and resume. No deepspeed, no torch.distributed.

A trainer on data-parallel rank `rank` of `world_size`:

    from train.data import DataConfig, prepare, build_stream
    from train.objectives import ObjectiveConfig
    prepared = prepare(data_cfg, objective_cfg)       # local rank 0 first, then a barrier, then all ranks
    stream = build_stream(prepared, objective_cfg, arch="nd", global_batch_size=G,
                          rank=rank, world_size=world_size, seed=seed)
    stream.load_state_dict(saved)                     # when resuming
    batch = next(stream)                              # this rank's G / world_size rows (the batch contract)
    saved = stream.state_dict()                       # into the checkpoint, after the step
    evals = build_stream(prepared, objective_cfg, arch="nd", global_batch_size=G, rank=rank,
                         world_size=world_size, seed=seed, split="eval")   # one pass, file order

`prepared.tokens.vocab_size` is the vocabulary the model needs (tokenizer plus added tokens).
"""
# Names resolve lazily (PEP 562) so that `train.data.config` — read by the run config, which
# `archscale submit` loads on a login node — does not pull in torch, datasets or tokenizers.
from importlib import import_module

_WHERE = {
    "DataConfig": "config", "STAT_KEYS": "stream", "DataStream": "stream", "TokenStore": "tokenize",
    "tokenize_dataset": "tokenize", "embedded_files": "corpus", "load_tokenizer": "tokenizer",
    "rank_classification_examples": "multitask", "read_records": "multitask", "validate_record": "multitask",
    "PreparedData": "api", "Split": "api", "build_stream": "api", "prepare": "api", "Prefetcher": "prefetch",
}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
