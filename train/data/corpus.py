"""Reading documents through `datasets`: the embedded corpus, files on disk, or a hub dataset.

The embedded corpus is this Python installation's own standard library: its `.py` sources
(code, docstrings, comments) and `pydoc_data/topics.py` (the language reference text used by
`help()`), one document per file, in sorted path order. It exists on every machine with no
download; its content depends on the Python version (3.11.7 here: ~440 files, ~6 MB).
"""
from __future__ import annotations

import glob
import logging
import os
import sysconfig

import numpy as np

from ..objectives import rng
from .config import DataConfig

log = logging.getLogger("archscale.data")

# Folders of the standard library left out of the embedded corpus: tests (huge, repetitive,
# some not UTF-8), vendored / generated code, and the codec tables of `encodings`.
EMBEDDED_EXCLUDE = ("test", "tests", "site-packages", "dist-packages", "__pycache__", "idlelib", "lib2to3",
                    "turtledemo", "ensurepip", "tkinter", "encodings")
EXTENSIONS = {".txt": "text", ".text": "text", ".md": "text", ".py": "text", ".json": "json", ".jsonl": "json",
              ".parquet": "parquet", ".arrow": "arrow"}


def embedded_files() -> list[str]:
    """Sorted absolute paths of the embedded corpus (deterministic for a Python installation)."""
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        parts = [] if rel == "." else rel.split(os.sep)
        if any(p in EMBEDDED_EXCLUDE or p.startswith("config-") for p in parts):
            dirnames[:] = []
            continue
        out.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
    if not out:
        raise RuntimeError(f"no .py files found under the standard library {root}; use data.source='files'")
    return sorted(out, key=lambda p: os.path.relpath(p, root))


def expand_files(patterns: list[str], what: str) -> list[str]:
    """Expand paths / glob patterns to a sorted list of files; error if one matches nothing."""
    files = []
    for pat in patterns:
        pat = os.path.expanduser(pat)
        hits = sorted(glob.glob(pat, recursive=True)) if glob.has_magic(pat) else ([pat] if os.path.exists(pat) else [])
        hits = [h for h in hits if os.path.isfile(h)]
        if not hits:
            raise FileNotFoundError(f"data.{what}: {pat!r} matches no file; check the path or pattern")
        files.extend(hits)
    return sorted(dict.fromkeys(files))


def file_format(files: list[str], fmt: str, what: str) -> str:
    """The datasets builder for these files ('text', 'json', 'parquet', 'arrow')."""
    if fmt == "multitask":
        return "json"
    if fmt != "auto":
        return fmt
    kinds = set()
    for f in files:
        ext = os.path.splitext(f[:-3] if f.endswith(".gz") else f)[1].lower()
        if ext not in EXTENSIONS:
            raise ValueError(f"data.{what}: cannot tell the format of {f!r} from its extension; set data.format "
                             f"to one of text, json, parquet, arrow")
        kinds.add(EXTENSIONS[ext])
    if len(kinds) > 1:
        raise ValueError(f"data.{what} mixes formats {sorted(kinds)}; use one format per list")
    return kinds.pop()


def _drop_empty(files: list[str], what: str) -> tuple[list[str], int]:
    nonempty = [f for f in files if os.path.getsize(f) > 0]
    skipped = len(files) - len(nonempty)
    if skipped:
        log.warning("data.%s: skipping %d empty file(s), e.g. %s", what, skipped,
                    next(f for f in files if os.path.getsize(f) == 0))
    if not nonempty:
        raise ValueError(f"data.{what}: all {len(files)} file(s) are empty, e.g. {files[0]!r}; point at real data")
    return nonempty, skipped


def _find_bad_utf8(files: list[str]) -> str:
    for f in files:
        with open(f, "rb") as fh:
            data = fh.read()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            return f"{f!r} is not valid UTF-8 (byte {data[e.start]:#04x} at offset {e.start})"
    return "a file is not valid UTF-8"


def _find_bad_jsonl(files: list[str]) -> str | None:
    """The first line of a JSON-lines file that is not a JSON object (a truncated last line, ...)."""
    import json

    for f in files:
        try:
            with open(f, encoding="utf-8", errors="replace") as fh:
                for i, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        ok = isinstance(json.loads(line), dict)
                    except ValueError:
                        ok = False
                    if not ok:
                        return f"{f!r} line {i} is not a JSON object (truncated or broken: {line.strip()[:40]!r})"
        except OSError:
            return None
    return None


def load_files(files: list[str], builder: str, cfg: DataConfig, what: str):
    """One `datasets.Dataset` from local files, with clear errors for the usual data problems."""
    import datasets

    files, _ = _drop_empty(files, what)
    kwargs = {}
    if builder == "text":
        kwargs = dict(sample_by=cfg.text_sample_by, encoding_errors=cfg.encoding_errors, keep_linebreaks=True)
    elif builder == "json":
        kwargs = dict(encoding_errors=cfg.encoding_errors)
    # datasets' "Downloading data" / "Generating train split" bars describe a hub download; for local
    # files they only mislead (nothing is downloaded), and the data log line already says what was read
    was_on = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    cache = os.path.join(cfg.resolved_cache_dir(), "datasets")
    try:
        try:
            ds = datasets.load_dataset(builder, data_files={"train": files}, split="train", cache_dir=cache, **kwargs)
        except Exception as e:  # a corrupt Arrow cache of the files (cut short, ...): built again from them
            ds = datasets.load_dataset(builder, data_files={"train": files}, split="train", cache_dir=cache,
                                       download_mode="force_redownload", **kwargs)
            log.warning("data.%s: datasets' cache of these files under %s did not read (%s: %s); built it again from "
                        "the files", what, cache, type(e).__name__, " ".join(str(e).split())[:120])
    except Exception as e:  # datasets wraps the cause: find a decode error to name the file
        cause = e
        while cause is not None and not isinstance(cause, UnicodeDecodeError):
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, UnicodeDecodeError):
            raise ValueError(f"data.{what}: {_find_bad_utf8(files)}; fix the file or set "
                             f"data.encoding_errors='replace'") from None
        bad = _find_bad_jsonl(files) if builder == "json" else None
        if bad:
            raise ValueError(f"data.{what}: {bad}; fix or drop that line (one JSON object per line)") from None
        raise ValueError(f"data.{what}: datasets could not read {len(files)} {builder} file(s) "
                         f"(first {files[0]!r}): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    finally:
        if was_on:
            datasets.utils.logging.enable_progress_bar()
    return ds


def held_out_mask(num_docs: int, fraction: float) -> np.ndarray:
    """Boolean (num_docs,): documents held out for eval, by a hash of their index (fixed per corpus)."""
    if fraction <= 0:
        return np.zeros(num_docs, dtype=bool)
    u = rng.uniform_float(rng.mix(rng.SALT_SPLIT, np.arange(num_docs)))
    mask = u < fraction
    if num_docs >= 2 and not mask.any():  # tiny corpora: hold out at least one document
        mask[int(np.argmin(u))] = True
    return mask


def _load_hub(cfg: DataConfig, split: str):
    """A hub split through `datasets`' cache under data.cache_dir. The source gone (offline, and not
    in that cache, or the hub unreachable) is one line naming it and the fix, not a traceback: its
    tokenized cache is found by the source's fingerprint, so it cannot be used without it."""
    import datasets

    cache = os.path.join(cfg.resolved_cache_dir(), "datasets")
    try:
        return datasets.load_dataset(cfg.hub_name, cfg.hub_config or None, split=split, cache_dir=cache)
    except ConnectionError as e:
        raise ValueError(f"data.hub_name={cfg.hub_name!r} (split {split!r}) cannot be read: not in the cache "
                         f"{cache} and the hub cannot be reached ({' '.join(str(e).split())[:120]}); restore that "
                         f"cache or run once online (HF_DATASETS_OFFLINE unset)") from None


def load_corpus(cfg: DataConfig, lazy_split: bool = False):
    """(train_dataset, eval_dataset or None, eval_doc_mask or None).

    When eval comes from the training data (no eval files / split), the same dataset is returned
    for both with a boolean mask of held-out documents, so tokenization runs (and caches) once.
    lazy_split: the mask as a rule (train/data/plan.py HeldOutRule: the same documents, no array).
    """
    import datasets

    from .plan import HeldOutRule

    held = HeldOutRule if lazy_split else held_out_mask
    if cfg.source == "embedded":
        files = embedded_files()
        ds = load_files(files, "text", DataConfig(text_sample_by="document", encoding_errors="replace",
                                                  cache_dir=cfg.cache_dir), "embedded corpus")
        return ds, None, held(len(ds), cfg.eval_fraction)
    if cfg.source == "hub":
        train = _load_hub(cfg, cfg.hub_train_split)
        if cfg.hub_eval_split:
            return train, _load_hub(cfg, cfg.hub_eval_split), None
        return train, None, held(len(train), cfg.eval_fraction)
    files = expand_files(cfg.train_files, "train_files")
    builder = file_format(files, cfg.format, "train_files")
    train = load_files(files, builder, cfg, "train_files")
    if cfg.eval_files:
        efiles = expand_files(cfg.eval_files, "eval_files")
        return train, load_files(efiles, file_format(efiles, cfg.format, "eval_files"), cfg, "eval_files"), None
    return train, None, held(len(train), cfg.eval_fraction)
