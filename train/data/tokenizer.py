"""Tokenizers: two built-in ones that need no download, or any local AutoTokenizer directory.

Built-in layout (T5 conventions): <pad>=0, </s>=1 (EOS), <unk>=2, then the byte-level vocabulary
(256 bytes + learned merges for builtin-bpe), then the mode tokens, then the sentinels with
<extra_id_0> last, i.e. the highest id, as in T5's vocabulary.
builtin-bpe is trained with the `tokenizers` library on the training split of the embedded corpus
(sorted file order, single-threaded, so it is the same on every machine with the same Python)
and cached under <cache_dir>/tokenizers/<key>/ where key hashes the corpus file list and sizes.
For a corpus such as C4, use the tokenizer that goes with it from a local directory, e.g. T5's
(`data.tokenizer=/path/to/t5-tokenizer`), which already has <extra_id_*> sentinels.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os

from ..atomic import atomic_path
from ..objectives import TokenInfo
from .config import BUILTIN_TOKENIZERS, DataConfig

log = logging.getLogger("archscale.data")
SPECIALS = ["<pad>", "</s>", "<unk>"]
TOKENIZER_VERSION = 1  # bump when the built-in recipe changes: invalidates the cache


def sentinel(i: int) -> str:
    return f"<extra_id_{i}>"


def _wrap(tok_obj):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok_obj, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def _bytes_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # 256 printable stand-ins for bytes
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    vocab.update({ch: len(SPECIALS) + i for i, ch in enumerate(alphabet)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _train_bpe(texts, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def builtin_bpe_path(cfg: DataConfig) -> str:
    """Train (once) and cache the built-in BPE; returns the tokenizer.json path.

    The cached file is checked at every call against the size and checksum recorded when it was
    written (train/data/checksums.py; 0.5 MB, well under a millisecond): a bad one (cut short,
    changed bytes) is named in one warning line and trained again, since the recipe is deterministic.
    One written before records existed is trusted if it parses, and recorded now."""
    from .corpus import embedded_files

    files = embedded_files()
    key = hashlib.sha256(json.dumps([TOKENIZER_VERSION, cfg.bpe_vocab_size, cfg.eval_fraction,
                                     [(os.path.basename(f), os.path.getsize(f)) for f in files]]).encode()).hexdigest()[:16]
    path = os.path.join(cfg.resolved_cache_dir(), "tokenizers", f"bpe-{cfg.bpe_vocab_size}-{key}", "tokenizer.json")
    if not os.path.exists(path) or not _cached_tokenizer_ok(path):
        _train_builtin_bpe(cfg, files, path)
    return path


def _cached_tokenizer_ok(path: str) -> bool:
    from . import checksums

    if checksums.has_record(path):
        why = checksums.problem(path)
    else:  # written before records existed: trusted if it parses
        try:
            from tokenizers import Tokenizer

            Tokenizer.from_file(path)
            why = None
        except Exception as e:  # tokenizers raises a bare Exception ("EOF while parsing a value ...")
            why = f"it does not parse: {' '.join(str(e).split())[:100]}"
        if why is None:
            checksums.write_record(path)
    if why is not None:
        log.warning("data.tokenizer=builtin-bpe: the cached tokenizer %s is corrupt (%s); training it again "
                    "(the built-in BPE is deterministic)", path, why)
    return why is None


def _train_builtin_bpe(cfg: DataConfig, files: list[str], path: str) -> None:
    """Train the built-in BPE on the embedded corpus's training split and write it (and its
    checksum record) atomically to path."""
    from . import checksums
    from .corpus import held_out_mask

    held = held_out_mask(len(files), cfg.eval_fraction)  # train the tokenizer on the training split only
    texts = [open(f, encoding="utf-8", errors="replace").read() for f, h in zip(files, held) if not h]
    prev = os.environ.get("RAYON_NUM_THREADS")
    os.environ["RAYON_NUM_THREADS"] = "1"  # one thread: the merge order cannot depend on scheduling
    try:
        tok = _train_bpe(texts, cfg.bpe_vocab_size)
    finally:
        if prev is None:
            os.environ.pop("RAYON_NUM_THREADS", None)
        else:
            os.environ["RAYON_NUM_THREADS"] = prev
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_path(path) as tmp:  # concurrent ranks never read half a file
        tok.save(str(tmp))
        checksums.write_record(path, tmp)  # before the rename: a tokenizer that exists has its record
    log.info("trained built-in BPE (vocab %d) on %d files -> %s", cfg.bpe_vocab_size, len(texts), path)


def load_tokenizer(cfg: DataConfig):
    """(tokenizer, TokenInfo): the configured tokenizer with EOS, pad, sentinels and mode tokens ensured."""
    if cfg.tokenizer == "builtin-bytes":
        tok = _wrap(_bytes_tokenizer())
    elif cfg.tokenizer == "builtin-bpe":
        from tokenizers import Tokenizer

        tok = _wrap(Tokenizer.from_file(builtin_bpe_path(cfg)))
    else:
        from transformers import AutoTokenizer

        path = os.path.expanduser(cfg.tokenizer)
        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:
            raise ValueError(f"data.tokenizer={cfg.tokenizer!r}: AutoTokenizer could not load it "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); point at a directory "
                             f"written by tokenizer.save_pretrained") from None
    return tok, ensure_special_tokens(tok, cfg)


def ensure_special_tokens(tok, cfg: DataConfig) -> TokenInfo:
    """Add EOS / pad / sentinels / mode tokens the tokenizer lacks; check the model's vocab has room."""
    before = len(tok)
    added = []
    if tok.eos_token is None:
        tok.add_special_tokens({"eos_token": "</s>"})
        added.append("</s>")
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": "<pad>"})
        added.append("<pad>")
    vocab = tok.get_vocab()
    # builtin: modes first, then sentinels from the last to <extra_id_0> (highest id, T5's layout)
    wanted = list(cfg.mode_tokens) + [sentinel(i) for i in reversed(range(cfg.num_sentinels))]
    missing = [t for t in wanted if t not in vocab]
    if missing:
        n = tok.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False) \
            if _accepts_replace(tok) else tok.add_special_tokens({"additional_special_tokens": missing})
        if n != len(missing):
            raise ValueError(f"data.tokenizer={cfg.tokenizer!r}: could add only {n} of {len(missing)} missing "
                             f"sentinel / mode tokens; use a tokenizer that has <extra_id_0>..<extra_id_"
                             f"{cfg.num_sentinels - 1}> or lower data.num_sentinels")
        added.extend(missing)
    size = len(tok)
    if cfg.max_vocab_size and size > cfg.max_vocab_size:
        raise ValueError(f"data.tokenizer={cfg.tokenizer!r} has {before} tokens and needs {len(added)} more "
                         f"(sentinels / mode / eos / pad): {size} > the model's vocabulary max_vocab_size="
                         f"{cfg.max_vocab_size}; raise the model's vocab_size to >= {size} or lower data.num_sentinels")
    if added:
        log.info("tokenizer %s: added %d tokens (%s...)", cfg.tokenizer, len(added), ", ".join(added[:4]))
    ids = tok.convert_tokens_to_ids
    return TokenInfo(vocab_size=size, pad_id=int(tok.pad_token_id), eos_id=int(tok.eos_token_id),
                     sentinel_ids=tuple(int(ids(sentinel(i))) for i in range(cfg.num_sentinels)),
                     mode_ids=tuple((m, int(ids(m))) for m in cfg.mode_tokens))


def _accepts_replace(tok) -> bool:
    import inspect

    try:
        return "replace_extra_special_tokens" in inspect.signature(tok.add_special_tokens).parameters
    except (TypeError, ValueError):
        return False


def tokenizer_fingerprint(tok) -> str:
    """A stable hash of the tokenizer's behaviour (its serialized model and added tokens)."""
    h = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tok.get_vocab().items())).encode())
    h.update(json.dumps([tok.eos_token_id, tok.pad_token_id, len(tok)]).encode())
    return h.hexdigest()[:16]


__all__ = ["BUILTIN_TOKENIZERS", "builtin_bpe_path", "ensure_special_tokens", "load_tokenizer", "sentinel",
           "tokenizer_fingerprint"]
