"""Security: YAML only through safe_load, every torch.load weights-only, no command injection into
a rendered sbatch script, and one trainer per run directory.

- YAML and pickle payloads go through the real CLI (the cases of bench/faults/inputs.py that carry
  one): refused with one line, and the payload (a `touch MARKER`) never runs.
- The code is grepped: no yaml.load / unsafe_load / full_load, no torch.load without weights_only=True
  in train/, slurm/, model_zoo/ and bench/.
- A rendered job script is *run* by bash with stand-ins for srun and scontrol: the overrides and
  the run directory carry `$(...)`, backticks, `;` and a newline, and must reach the trainer's
  argv byte for byte while no marker file appears; an #SBATCH value with a line break, and an
  environment name that is not an identifier, are refused at render time.
- Two real trainers on one run directory: the second is refused with one line while the first
  runs on, and the first ends bitwise equal to the uninterrupted run.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .common import DELAY_ENV, ROOT, Row, launch, logged_step, one_error_line, run_cli, run_overrides, same_run, wait_for
from .inputs import CASES, make_base, run_case

PAYLOAD_CASES = ("yaml_python_object", "override_python_tag", "malicious_pickle_checkpoint", "inspect_malicious_batch")
UNSAFE = [(re.compile(r"\byaml\.(load|unsafe_load|full_load)\s*\("), "yaml load other than safe_load"),
          (re.compile(r"torch\.load\((?![^)]*weights_only=True)"), "torch.load without weights_only=True")]


def grep_unsafe_loads() -> list[str]:
    hits = []
    for folder in ("train", "slurm", "model_zoo", "bench"):
        for f in sorted((ROOT / folder).rglob("*.py")):
            for i, line in enumerate(f.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                hits += [f"{f.relative_to(ROOT)}:{i}: {why}" for rx, why in UNSAFE if rx.search(code)]
    return hits


STUBS = {"srun": '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n',
         "scontrol": '#!/bin/bash\n[ "$1" = show ] && { echo localhost; exit 0; }\nexit 0\n'}


def sbatch_injection(work: Path) -> list[str]:
    """What went wrong ([] if nothing) when bash runs a job script rendered from hostile values."""
    from slurm import Resources, render_job, trainer_command

    d = work / "inject"
    shutil.rmtree(d, ignore_errors=True)
    (d / "bin").mkdir(parents=True)
    for name, text in STUBS.items():
        (d / "bin" / name).write_text(text)
        (d / "bin" / name).chmod(0o755)
    m = [d / f"M{i}" for i in range(6)]
    hostile = [f"data.name=$(touch {m[0]})", f"a.b=`touch {m[1]}`", f"x=1;touch {m[2]}", f"y=1\ntouch {m[3]}",
               f"z=1' ; touch {m[4]} ; '"]
    argv_out = d / "argv.json"
    probe = ["-c", f"import json, sys; open({str(argv_out)!r}, 'w').write(json.dumps(sys.argv[1:]))"]
    run_dir = d / "run$(id)`id`;id"
    cmd = trainer_command(None, hostile, run_dir, python=sys.executable, entry=probe)
    problems = []
    script = render_job(cmd, run_dir, Resources(), job_name=f"j$(touch {m[5]})", env={"SAFE": "$(touch x)"})
    (d / "job.sh").write_text(script)
    e = {"PATH": f"{d / 'bin'}:/usr/bin:/bin", "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": "7",
         "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS_PER_NODE": "1"}
    p = subprocess.run(["bash", str(d / "job.sh")], cwd=d, env=e, capture_output=True, text=True, timeout=60)
    got = json.loads(argv_out.read_text()) if argv_out.exists() else None
    if got != [*hostile, f"run_dir={run_dir}"]:
        problems.append(f"the trainer's argv was {got!r} (script rc {p.returncode}: {p.stderr[-300:]!r})")
    problems += [f"injected command ran: {x.name} exists" for x in m if x.exists()]
    for what, kw in [("job name with a newline", dict(job_name="a\ntouch /tmp/x")),
                     ("sbatch_args with a newline", dict(res=Resources(sbatch_args=("--comment=a\ntouch x",)))),
                     ("partition with a newline", dict(res=Resources(partition="gpu\nrm -rf /"))),
                     ("env name with ;", dict(env={"A;touch x": "1"}))]:
        try:
            render_job(cmd, d / "run", kw.get("res", Resources()), job_name=kw.get("job_name"), env=kw.get("env"))
            problems.append(f"{what}: rendered, not refused")
        except ValueError:
            pass
    return problems


def second_trainer(work: Path, steps: int = 12) -> str:
    """'' when a second trainer on a run directory in use is refused with one line and writes
    nothing there, and the first run still ends bitwise equal to its uninterrupted twin. The first
    trainer is held inside its first save (a long SAVE_DELAY after the engine files: it writes
    nothing meanwhile), so every change while the second runs would be the second's; then it is
    killed and the run resumed to its end."""
    from .common import diff_hashes, hashes, kill_group
    from .kills import reference

    ref = reference(work, steps, 2)
    run = work / "locked"
    shutil.rmtree(run, ignore_errors=True)
    ov = run_overrides(work, run, steps, 2)
    first = launch(["train", *ov], work, **{DELAY_ENV: 600})
    saving = lambda: any((d / "engine").glob("*optim_states.pt") for d in (run / "checkpoints").glob("*.tmp"))  # noqa: E731
    if not wait_for(first, saving):
        return f"the first trainer did not reach its first save: {first.stdout.read()[-500:]}"
    before, t0 = None, time.monotonic()
    while time.monotonic() - t0 < 60:  # the engine files are complete: the first now only sleeps
        now = hashes([run])
        if now == before:
            break
        before = now
        time.sleep(1.0)
    second = run_cli(["train", *ov], work)
    changes = diff_hashes(before, hashes([run]))
    alive = first.poll() is None
    kill_group(first)
    why = one_error_line(second, "in use") or (f"the second trainer wrote: {changes[:3]}" if changes else "") \
        or ("" if alive else f"the first trainer ended (rc {first.returncode})")
    if why:
        return why
    done = run_cli(["train", *ov], work)
    return (f"the resume failed: {done.stderr[-300:]}" if done.returncode else "") or same_run(ref, run, steps)


def security(work: Path, log=print) -> Row:
    row = Row("security: safe_load, weights_only, sbatch quoting, run-dir lock")
    base = make_base(work)
    for case in (c for c in CASES if c[0] in PAYLOAD_CASES):
        ok, msg = run_case(work, base, case)
        row.case(case[0], ok, msg)
        log(f"  {'ok  ' if ok else 'FAIL'} payload {case[0]}: {msg[:200]}")
    hits = grep_unsafe_loads()
    row.case("grep: no unsafe yaml / torch.load", not hits, "; ".join(hits[:5]))
    log(f"  {'ok  ' if not hits else 'FAIL'} grep for unsafe loads: {hits[:5] or 'none'}")
    problems = sbatch_injection(work)
    row.case("sbatch injection", not problems, "; ".join(problems))
    log(f"  {'ok  ' if not problems else 'FAIL'} rendered sbatch script run by bash: {problems or 'no injection'}")
    why = second_trainer(work)
    row.case("second trainer on a run dir in use", not why, why)
    log(f"  {'ok  ' if not why else 'FAIL'} second trainer refused, first unharmed: {why or 'yes'}")
    row.notes = "payload cases via the CLI; grep of train/ slurm/ model_zoo/ bench/; job.sh run by bash; 2 real trainers"
    return row
