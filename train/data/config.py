"""Typed config of the data pipeline (one section of the run config). See docs/data.md.

Every bad value raises ValueError naming the field, the value and a fix.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

SOURCES = ("embedded", "files", "hub")
FORMATS = ("auto", "text", "json", "parquet", "arrow", "multitask")
SAMPLE_BY = ("document", "paragraph", "line")
ENCODING_ERRORS = ("strict", "replace", "ignore")
BUILTIN_TOKENIZERS = ("builtin-bpe", "builtin-bytes")
BAD_ROWS = ("error", "skip")
EPOCH_ORDERS = ("permutation", "feistel")


@dataclass
class DataConfig:
    """Where the text comes from, how it is tokenized, and how the stream is ordered and packed."""

    source: str = "embedded"
    """embedded: this Python installation's standard library sources and docs (no download);
    files: `train_files` / `eval_files` on disk; hub: the dataset `hub_name` (needs network)."""
    train_files: list[str] = field(default_factory=list)
    """source=files: paths or glob patterns (`**` allowed) of the training data, in any order
    (they are sorted). Format from `format` or the extension."""
    eval_files: list[str] = field(default_factory=list)
    """Held-out files for eval loss. Empty: hold out `eval_fraction` of the training documents."""
    format: str = "auto"
    """auto (from the extension: .txt/.text -> text, .json/.jsonl -> json, .parquet, .arrow) |
    text | json | parquet | arrow | multitask (prompted input/target JSONL; see docs/data.md)."""
    hub_name: str = ""
    """source=hub: dataset name on the hub, e.g. 'allenai/c4' (never used in tests)."""
    hub_config: str = ""
    """source=hub: dataset config name, e.g. 'en'; '' = the default config."""
    hub_train_split: str = "train"
    """source=hub: split used for training."""
    hub_eval_split: str = "validation"
    """source=hub: split used for eval loss ('' = hold out eval_fraction of the training split)."""
    text_field: str = "text"
    """Column / JSON field holding the document text."""
    text_sample_by: str = "document"
    """Text files: one document per file (document), per blank-line paragraph, or per line."""
    encoding_errors: str = "strict"
    """Invalid UTF-8: strict (stop with the file named) | replace (U+FFFD) | ignore (drop bytes)."""
    bad_rows: str = "error"
    """Rows whose text field is missing or null: error (stop, naming the row) | skip (count them)."""
    eval_fraction: float = 0.02
    """Fraction of documents held out for eval when there are no eval files (chosen by a hash of
    the document index, so fixed for a given corpus). 0 = no eval split."""
    max_documents: int = 0
    """Use only the first N documents of each split (after the hold-out); 0 = all. For smoke tests."""
    tokenizer: str = "builtin-bpe"
    """builtin-bpe: byte-level BPE trained deterministically on the embedded corpus and cached;
    builtin-bytes: one token per byte (no training); else a local directory for AutoTokenizer."""
    bpe_vocab_size: int = 8192
    """builtin-bpe: size of the learned vocabulary (before sentinels and mode tokens)."""
    num_sentinels: int = 100
    """Sentinel tokens <extra_id_0>..<extra_id_{N-1}> ensured in the tokenizer (T5 has 100)."""
    mode_tokens: list[str] = field(default_factory=lambda: ["[NLU]", "[NLG]", "[S2S]"])
    """UL2 mode tokens ensured in the tokenizer."""
    max_vocab_size: int = 0
    """The model's vocabulary size: fail at start-up if the tokenizer (with the tokens we add)
    is larger. 0 = no check."""
    append_eos: bool = True
    """flm / plm: end every document with EOS (mlm and ul2 end inputs and targets with EOS as T5)."""
    cache_dir: str = ""
    """Tokenizers, datasets and tokenized caches. '' = $ARCHSCALE_CACHE or ~/.cache/archscale."""
    num_proc: int = 0
    """Processes for tokenization: 0 = one per core this process may run on (its CPU affinity:
    os.sched_getaffinity, e.g. a Slurm task's CPUs); 1 = in this process. At most one per shard
    left to do. The tokens are the same whatever the number."""
    shard_documents: int = 10000
    """Tokenization shard: documents [i*N, (i+1)*N) are tokenized by one process and cached as one
    file, written atomically; a killed tokenization resumes from the shards written, and
    `archscale tokenize --submit` runs shard ranges as a Slurm job array. Changing it re-tokenizes."""
    seed: int = 1234
    """Seed of the data order, the PLM split points and the noise masks. Separate from the run's
    `seed` (initialisation, dropout), so every cell of a comparison sees the same data in the same
    order whatever its initialisation."""
    shuffle: bool = True
    """Training order: a permutation of documents drawn from (seed, epoch); False = file order."""
    epoch_order: str = "permutation"
    """How an epoch's order is held (train/data/plan.py, docs/data.md): permutation = a numpy
    permutation of the split's document ids (int64 arrays: ~32 bytes per document per process; the
    pinned golden order); feistel = a keyed Feistel bijection of the document index, evaluated per
    chunk of positions, the split as the held-out hash predicate and the lengths read zero-copy
    from the Arrow column, so a process's memory does not grow with the corpus. Another order:
    a state saved with one does not load into the other."""
    pack_lookahead: int = 64
    """Packing: up to this many examples that fit no row of the current global batch wait for the
    next one (the only packer state, saved in the stream position). Capped at the global batch."""
    prefetch: int = 2
    """Training batches made ahead in a background thread (pinned when training on CUDA), so
    packing and span corruption overlap the step; checkpoints record the position of the batches
    trained on, not of those made ahead. 0 = off (batches made on demand in the training loop)."""

    allow_embedded: bool = True
    """Whether training may read the embedded corpus (source=embedded). The reference presets
    (configs/reference_*.yaml) set false, so a run of them without its data is refused at start
    (`check_training_source`) instead of training a multi-billion model on this installation's
    own sources; true trains on it anyway (e.g. a rehearsal). Planning does not read data and
    ignores it."""

    def __post_init__(self) -> None:
        self.validate()

    def check_training_source(self) -> None:
        """Refuse (ValueError, one line) to train on the embedded corpus where allow_embedded=false.
        Called by the trainer's start-up check and by `archscale submit`, not by validate (plan and
        inspect read configs without training on them)."""
        if self.source == "embedded" and not self.allow_embedded:
            raise ValueError("data.source=embedded with data.allow_embedded=false (a reference preset): set "
                             "data.source=files data.train_files=[PATHS OR GLOBS] (the reference data is C4), or "
                             "data.allow_embedded=true to train on the embedded corpus anyway")

    def validate(self) -> None:
        def choice(name, valid):
            v = getattr(self, name)
            if v not in valid:
                raise ValueError(f"data.{name}={v!r} is not valid; choose one of {valid}")

        choice("source", SOURCES)
        choice("format", FORMATS)
        choice("text_sample_by", SAMPLE_BY)
        choice("encoding_errors", ENCODING_ERRORS)
        choice("bad_rows", BAD_ROWS)
        choice("epoch_order", EPOCH_ORDERS)
        for name in ("train_files", "eval_files", "mode_tokens"):
            v = getattr(self, name)
            if isinstance(v, str) or not all(isinstance(x, str) for x in v):
                raise ValueError(f"data.{name} must be a list of strings, got {v!r}")
        if self.source == "files" and not self.train_files:
            raise ValueError("data.source='files' needs data.train_files (paths or glob patterns)")
        if self.source == "hub" and not self.hub_name:
            raise ValueError("data.source='hub' needs data.hub_name (e.g. 'allenai/c4' with hub_config='en')")
        if self.format == "multitask" and self.source != "files":
            raise ValueError("data.format='multitask' reads JSONL files: set data.source='files'")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"data.eval_fraction={self.eval_fraction} must be in [0, 1)")
        for name, low in (("max_documents", 0), ("bpe_vocab_size", 300), ("num_sentinels", 0),
                          ("max_vocab_size", 0), ("num_proc", 0), ("shard_documents", 1),
                          ("pack_lookahead", 1), ("prefetch", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                hint = " (0 = one process per available core)" if name == "num_proc" else ""
                raise ValueError(f"data.{name}={v!r} must be an integer >= {low}{hint}")
        if self.tokenizer not in BUILTIN_TOKENIZERS and not os.path.isdir(os.path.expanduser(self.tokenizer)):
            raise ValueError(f"data.tokenizer={self.tokenizer!r} is neither one of {BUILTIN_TOKENIZERS} nor an "
                             f"existing local directory (save one with tokenizer.save_pretrained(DIR))")

    def resolved_cache_dir(self) -> str:
        d = self.cache_dir or os.environ.get("ARCHSCALE_CACHE") or os.path.join("~", ".cache", "archscale")
        return os.path.abspath(os.path.expanduser(d))
