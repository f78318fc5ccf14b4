"""Bad inputs through the real CLI: each case is one subprocess of `archscale train` / `eval` /
`inspect` / `export`, with the sha256 of every file of the run directory and of the inputs taken
before and after. A case passes when the command exits non-zero with exactly one `error:` line on
stderr that names the problem (the case's expected words), no traceback, and no existing file
changed or deleted (new files are reported too: none may appear either).

A damaged cache is the other kind of bad input (`REPAIRS`): a tokenized shard cut to a third or with
4 KiB flipped, or the cached built-in tokenizer cut short. The source is still there, so the stack
repairs it: the case passes when a fresh run names the file in one warning line, rebuilds it and
trains, exit 0 and no traceback.

Every case starts from a copy of one resumable run (ND:PLM, ZeRO-1, checkpoints at steps 2 and 4
of 6, see `make_base`), so a case that the trainer failed to refuse would train into its copy.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

from .common import Row, diff_hashes, hashes, one_error_line, run_cli, run_overrides

BASE_STEPS, CASE_STEPS = 12, 14
LAST = f"checkpoints/step-{BASE_STEPS:08d}"


def make_base(work: Path) -> Path:
    """The run every case copies: the campaign's uninterrupted 12-step run (checkpoints 10 and 12,
    kills.reference), FINISHED removed: resumable to 14."""
    from .kills import reference

    base = work / "inputs-base"
    if not (base / LAST / "COMPLETE").is_file():
        shutil.rmtree(base, ignore_errors=True)
        shutil.copytree(reference(work, BASE_STEPS, 2), base)
    (base / "FINISHED").unlink(missing_ok=True)
    return base


def _refresh_manifest(step_dir: Path) -> None:
    """Rewrite COMPLETE's file list as an attacker who edits a checkpoint would (so the size check
    passes and the check behind it is the one tested)."""
    marker = json.loads((step_dir / "COMPLETE").read_text())
    marker["files"] = {str(p.relative_to(step_dir)): p.stat().st_size for p in sorted(step_dir.rglob("*"))
                       if p.is_file() and p.name != "COMPLETE"}
    (step_dir / "COMPLETE").write_text(json.dumps(marker) + "\n")


def _evil_pickle(path: Path, marker: Path) -> None:
    """A torch.save file whose unpickling would create `marker` (os.system)."""
    code = ("import os, sys, torch\n"
            "class Evil:\n"
            "    def __reduce__(self):\n"
            f"        return (os.system, ('touch {marker}',))\n"
            f"torch.save({{'module': Evil(), 'input_ids': Evil()}}, {str(path)!r})\n")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


# A case: (name, expected words, build(work, run) -> (argv, extra inputs to hash)). `run` is the case's
# copy of the base run; `args` are the case's train overrides (run_overrides of `run`).
Case = tuple[str, str, Callable[[Path, Path], tuple[list[str], list[Path]]]]


def _train(extra=(), *, config: Path | None = None) -> Callable:
    """`archscale train [CONFIG] <the run's overrides> extra...`"""
    def build(work: Path, run: Path):
        args = ([str(config(work))] if callable(config) else []) + run_overrides(work, run, CASE_STEPS, every=2)
        return ["train", *args, *extra], []
    return build


def _config(name: str, content: bytes | str) -> Callable[[Path], Path]:
    def make(work: Path) -> Path:
        p = work / "inputs" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            p.mkdir(exist_ok=True)
        else:
            p.write_bytes(content.encode() if isinstance(content, str) else content)
        return p
    return make


def _data(files: dict[str, bytes | str], pattern: str = "*") -> Callable:
    """A fresh run (new run_dir) over data files written here: the data checks, not the resume."""
    def build(work: Path, run: Path):
        d = run.parent / (run.name + "-data")
        d.mkdir(parents=True, exist_ok=True)
        for n, c in files.items():
            (d / n).write_bytes(c.encode() if isinstance(c, str) else c)
        ov = [o for o in run_overrides(work, run / "fresh", CASE_STEPS, every=2) if not o.startswith("data.train_files")]
        return ["train", *ov, f"data.train_files={json.dumps([str(d / pattern)])}",
                f"data.cache_dir={run.parent / (run.name + '-cache')}"], [d]
    return build


def _ckpt(mutate: Callable[[Path, Path], None], extra=()) -> Callable:
    """Damage the case's copy (mutate(run, step_dir of its last checkpoint)), then resume it."""
    def build(work: Path, run: Path):
        mutate(run, run / LAST)
        return ["train", *run_overrides(work, run, CASE_STEPS, every=2), *extra], []
    return build


def _truncate(name: str, size: int = 1000):
    return lambda run, step: os.truncate(step / name, size)


def _state_wrong_type(run: Path, step: Path) -> None:
    st = json.loads((step / "trainer_state.json").read_text())
    st["step"] = "four"
    (step / "trainer_state.json").write_text(json.dumps(st))
    _refresh_manifest(step)


def _evil_ckpt(run: Path, step: Path) -> None:
    _evil_pickle(step / "engine" / "mp_rank_00_model_states.pt", run.parent / (run.name + "-PWNED"))
    _refresh_manifest(step)


def _lock_holder(run: Path) -> subprocess.Popen:
    """Another process holding the run's lock (as a running trainer does)."""
    code = ("import fcntl, os, sys, time\n"
            f"fd = os.open({str(run / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX); os.ftruncate(fd, 0); os.write(fd, b'pid %d (a test holder)' % os.getpid())\n"
            "print('locked', flush=True); time.sleep(600)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    p.stdout.readline()
    return p


def _eval(args: Callable[[Path, Path], list[str]]) -> Callable:
    def build(work: Path, run: Path):
        return ["eval", *args(work, run)], [work / "inputs"]
    return build


def _tasks(work: Path, name: str, text: str) -> str:
    p = work / "inputs" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return str(p)


GOOD_TASK = json.dumps({"input": "fine", "answer_choices": ["a", "b"], "label": 1})
PAYLOAD = 'optim: !!python/object/apply:os.system ["touch /tmp/archscale-faults-PWNED"]\n'

CASES: list[Case] = [
    # the config file
    ("yaml_syntax", "not valid YAML", _train(config=_config("syntax.yaml", "model: [cd\n  size: debug\n"))),
    ("yaml_top_level_list", "expected a mapping", _train(config=_config("list.yaml", "- model\n- optim\n"))),
    ("yaml_wrong_type", "seed", _train(config=_config("type.yaml", "seed: [1, 2]\n"))),
    ("yaml_section_scalar", "optim", _train(config=_config("scalar.yaml", "optim: 3\n"))),
    ("yaml_unknown_key", "lrr", _train(config=_config("unknown.yaml", "optim:\n  lrr: 0.1\n"))),
    ("yaml_python_object", "constructor", _train(config=_config("payload.yaml", PAYLOAD))),
    ("yaml_binary", "not UTF-8", _train(config=_config("binary.yaml", b"\xff\xfe\x00\x81garbage"))),
    ("yaml_missing", "does not exist", _train(config=lambda w: w / "inputs" / "nope.yaml")),
    ("yaml_is_a_directory", "cannot be read", _train(config=_config("dir.yaml", None))),
    ("yaml_duplicate_key", "given twice", _train(config=_config("twice.yaml", "optim: {lr: 0.001, lr: 0.5}\n"))),
    ("yaml_non_finite", "not a finite number", _train(config=_config("nan.yaml", "optim:\n  eps: .nan\n"))),
    # overrides
    ("override_unknown_key", "optim.lrr", _train(["optim.lrr=0.1"])),
    ("override_without_equals", "bad override", _train(["optim.lr"])),
    ("override_empty_key", "bad override", _train(["=3"])),
    ("override_empty_part", "bad override", _train(["optim..lr=3"])),
    ("override_python_tag", "optim.lr", _train(["optim.lr=!!python/object/apply:os.system [\"true\"]"])),
    ("override_unknown_arch", "model.arch", _train(["model.arch=xd"])),
    ("negative_max_steps", "max_steps", _train(["schedule.max_steps=-1"])),
    ("zero_micro_batch", "micro_batch_size", _train(["parallel.micro_batch_size=0"])),
    ("negative_seq_length", "seq_length", _train(["objective.seq_length=-64"])),
    ("negative_lr", "optim.lr", _train(["optim.lr=-1"])),
    ("override_non_finite", "not a finite number", _train(["optim.lr=inf"])),
    ("batch_not_divisible", "global_batch_size", _train(["parallel.global_batch_size=5"])),
    ("run_cannot_fit", "does not fit", _train(["run_dir=RUN/fresh", "model.overrides.d_model=16384",  # ~4.5 TiB
                                               "model.overrides.n_layers=64", "model.overrides.d_ff=65536"])),
    # data
    ("data_matches_nothing", "matches no file", _data({}, "*.txt")),
    ("data_empty_files", "empty", _data({"a.txt": "", "b.txt": ""})),
    ("data_binary", "UTF-8", _data({"a.txt": bytes(range(256)) * 64})),
    ("data_non_utf8", "UTF-8", _data({"a.txt": "caf\xe9 cr\xe8me br\xfbl\xe9e. ".encode("latin-1") * 200})),
    ("data_jsonl_truncated", "line 2", _data({"a.jsonl": json.dumps({"text": "hello world " * 50}) + "\n{\"text\": \"hel"})),
    ("data_jsonl_wrong_field", "text", _data({"a.jsonl": json.dumps({"body": "hello world " * 50}) + "\n"})),
    ("data_jsonl_not_objects", "a.jsonl", _data({"a.jsonl": "[1, 2, 3]\n[4, 5]\n"})),
    # checkpoints
    ("shard_truncated", "truncated", _ckpt(_truncate("engine/mp_rank_00_model_states.pt"))),
    ("optimizer_shard_truncated", "truncated", _ckpt(_truncate("engine/zero_pp_rank_0_mp_rank_00_optim_states.pt"))),
    ("shard_deleted", "missing", _ckpt(lambda r, s: (s / "engine/zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink())),
    ("engine_dir_deleted", "missing", _ckpt(lambda r, s: shutil.rmtree(s / "engine"))),
    ("trainer_state_garbage", "trainer_state.json", _ckpt(lambda r, s: (s / "trainer_state.json").write_text("{\x00"))),
    ("trainer_state_wrong_type", "step", _ckpt(_state_wrong_type)),
    ("complete_marker_garbage", "COMPLETE", _ckpt(lambda r, s: (s / "COMPLETE").write_text("garbage{"))),
    ("malicious_pickle_checkpoint", "refused", _ckpt(_evil_ckpt)),
    ("checkpoint_of_another_arch", "model.arch=nd", _ckpt(lambda r, s: None, ["model.arch=cd"])),
    ("checkpoint_of_another_objective", "objective.name=plm", _ckpt(lambda r, s: None, ["objective.name=flm"])),
    ("resume_a_tmp_dir", "incomplete", _ckpt(lambda r, s: shutil.copytree(s, Path(str(s) + "0.tmp")),
                                            [f"checkpoint.resume=RUN/{LAST}0.tmp"])),
    ("resume_missing_path", "no such path", _ckpt(lambda r, s: None, ["checkpoint.resume=/nonexistent/step-00000009"])),
    ("init_from_another_family", "init.from_checkpoint", _train(
        ["run_dir=RUN/child", "model.arch=ed", "objective.name=mlm", "objective.inputs_length=64",
         "objective.targets_length=14", "init.from_checkpoint=RUN"])),
    ("run_dir_in_use", "in use", _ckpt(lambda r, s: None)),  # the lock is held (see run_case)
    ("run_dir_is_a_file", "run_dir", _train(["run_dir=RUN/config.yaml"])),
    # the other commands
    ("eval_tasks_missing", "nope.jsonl", _eval(lambda w, r: [str(r), "--tasks", str(w / "inputs" / "nope.jsonl")])),
    ("eval_tasks_truncated", "t.jsonl:2", _eval(lambda w, r: [str(r), "--tasks", _tasks(w, "t.jsonl", GOOD_TASK + "\n{\"inp")])),
    ("eval_no_checkpoint", "checkpoint", _eval(lambda w, r: [str(r / "tb-none"), "--tasks",
                                                            _tasks(w, "ok.jsonl", GOOD_TASK + "\n")])),
    ("inspect_malicious_batch", "refused", lambda w, r: (
        ["inspect", *run_overrides(w, r, CASE_STEPS), "--batch", str(_batch(w, r))], [])),
    ("export_truncated_checkpoint", "truncated", lambda w, r: (
        (_truncate("engine/mp_rank_00_model_states.pt")(r, r / LAST), ["export", str(r)])[1], [])),
]


# Caches that repair themselves (train/data/checksums.py): a fresh 2-step run over a damaged copy of a
# cache. A case passes when the run names the damaged file in exactly one warning line (with the
# case's words), rebuilds it, exits 0 with no traceback and trains (steps 1 and 2 logged).
REPAIR_STEPS = 2


def _largest_shard(cache: Path) -> Path:
    return max((cache / "tokenized").glob("*/shard-*.arrow"), key=lambda p: p.stat().st_size)


def _flip_middle(p: Path) -> None:
    """4 KiB (or the whole file, if smaller) XORed with 0xFF around the middle: same size, other bytes."""
    n = p.stat().st_size
    at, k = max(0, n // 2 - 2048), min(4096, n)
    with open(p, "r+b") as f:
        f.seek(at)
        block = f.read(k)
        f.seek(at)
        f.write(bytes(b ^ 0xFF for b in block))


def _fresh_run(work: Path, run: Path, cache: Path, extra=()) -> list[str]:
    ov = [o for o in run_overrides(work, run / "fresh", CASE_STEPS, every=2) if not o.startswith("data.cache_dir")]
    return ["train", *ov, f"data.cache_dir={cache}", f"schedule.max_steps={REPAIR_STEPS}", *extra]


def _damaged_shard(damage: Callable[[Path], None]) -> Callable:
    """The base run's cache (byte tokenizer) copied, its largest shard damaged."""
    def build(work: Path, run: Path):
        cache = run.parent / (run.name + "-cache")
        shutil.rmtree(cache, ignore_errors=True)
        shutil.copytree(work / "cache", cache)
        damage(_largest_shard(cache))
        return _fresh_run(work, run, cache), cache
    return build


def _damaged_tokenizer(work: Path, run: Path):
    """The built-in BPE trained into a cache of its own (in this process, from the run's own data
    config: its path depends on the vocabulary size and eval_fraction), tokenizer.json cut to a third."""
    from train.config import load_config
    from train.data.tokenizer import builtin_bpe_path

    cache = run.parent / (run.name + "-cache")
    shutil.rmtree(cache, ignore_errors=True)
    argv = _fresh_run(work, run, cache, ["data.tokenizer=builtin-bpe"])
    path = Path(builtin_bpe_path(load_config(None, argv[1:]).data))
    os.truncate(path, path.stat().st_size // 3)
    return argv, cache


REPAIRS: list[Case] = [
    ("cache_shard_truncated", "cut short", _damaged_shard(lambda p: os.truncate(p, p.stat().st_size // 3))),
    ("cache_shard_flipped", "checksum differs", _damaged_shard(_flip_middle)),
    ("cache_tokenizer_truncated", "training it again", _damaged_tokenizer),
]


def repair_case(work: Path, base: Path, case: Case) -> tuple[bool, str]:
    name, expect, build = case
    run = work / "cases" / name
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    argv, cache = build(work, run)
    p = run_cli(argv, work, timeout=300)
    out = p.stderr + p.stdout
    warned = [line for line in out.splitlines() if "is corrupt" in line]
    why = ""
    if p.returncode != 0 or "Traceback" in out:
        why = f"exit {p.returncode}: {out.strip()[-300:]!r}"
    elif len(warned) != 1 or expect not in warned[0]:
        why = f"{len(warned)} warning lines naming the damage (want 1 with {expect!r}): {warned[:2]}"
    elif str(cache) not in warned[0]:
        why = f"the warning does not name the file: {warned[0][:300]}"
    else:
        steps = [json.loads(line).get("step") for line in (run / "fresh" / "metrics.jsonl").read_text().splitlines()
                 if '"loss"' in line] if (run / "fresh" / "metrics.jsonl").is_file() else []
        if sorted(set(steps)) != list(range(1, REPAIR_STEPS + 1)):
            why = f"did not train after the repair (logged steps {steps})"
    return not why, why or warned[0].strip()


def _batch(work: Path, run: Path) -> Path:
    p = run.parent / (run.name + "-batch.pt")
    _evil_pickle(p, run.parent / (run.name + "-PWNED"))
    return p


def run_case(work: Path, base: Path, case: Case) -> tuple[bool, str]:
    name, expect, build = case
    run = work / "cases" / name
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(base, run)
    argv, inputs = build(work, run)
    argv = [a.replace("RUN/", f"{run}/").replace("=RUN", f"={run}") for a in argv]
    watched = [run, work / "corpus", *inputs] + [Path(a) for a in argv if os.path.isabs(a) and os.path.exists(a)]
    before = hashes(watched)
    holder = _lock_holder(run) if name == "run_dir_in_use" else None
    try:
        p = run_cli(argv, work, timeout=300)
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
    if holder is not None:  # the holder wrote its pid into .lock: that is the holder's write
        before.pop(str(run / ".lock"), None)
    why = one_error_line(p, expect)
    after = hashes(watched)
    if holder is not None:
        after.pop(str(run / ".lock"), None)
    changes = diff_hashes(before, after)
    pwned = list(work.glob("cases/*-PWNED")) + [Path("/tmp/archscale-faults-PWNED")]
    if any(x.exists() for x in pwned):
        why = f"a pickle / YAML payload ran ({[str(x) for x in pwned if x.exists()]})"
    if not why and changes:
        why = f"files touched: {changes[:4]}"
    line = next((l for l in p.stderr.splitlines() if l.startswith("error:")), "")
    return not why, why or line


def bad_inputs(work: Path, names: list[str] | None = None, log=print) -> Row:
    row = Row("bad inputs: one line; refused (exit != 0, nothing changed) or repaired (then trains)")
    base = make_base(work)
    for case in CASES + REPAIRS:
        if names and case[0] not in names:
            continue
        ok, msg = (repair_case if case in REPAIRS else run_case)(work, base, case)
        row.case(case[0], ok, msg)
        log(f"  {'ok  ' if ok else 'FAIL'} {case[0]}: {msg[:220]}")
    row.notes = (f"{row.tried} cases through the real CLI (train, eval, inspect, export), every file of a refused "
                 f"one hashed; damaged caches repaired")
    return row
