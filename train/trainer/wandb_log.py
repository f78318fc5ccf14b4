"""Weights & Biases logging (``logging.wandb``): the run's resolved config and every metrics.jsonl
line, sent from rank 0 where the line is written (MetricsCallback.log), so W&B holds what the JSONL
holds. Off by default; ``pip install 'archscale[wandb]'``.

One W&B run per run directory, across kills, requeues and resumes:
- its id is made once and kept in RUN/wandb.json; every later start of the run (a Slurm requeue,
  a resume, a rerun of a finished run) opens the same W&B run with ``wandb.init(id=ID,
  resume="allow")``. ``checkpoint.resume=never`` (a fresh start of the directory) makes a new id.
- W&B's step is the trainer's step: ``run.log(line, step=line["step"])``; a step's training line
  and its held-out line land in the same W&B row (``step`` given: W&B merges logs of one step until
  a later step arrives).
- A resume from the checkpoint of step s trains steps s+1.. again, and ``trim_jsonl`` drops their
  lines from metrics.jsonl; W&B cannot take them back. W&B's own rule is that a step below the run's
  last step is refused (online, a resumed run starts after the last step the server has, and
  ``log(step=earlier)`` is dropped with a warning; offline, each start is a separate file that
  ``wandb sync`` uploads to the same id, with no such check). So this module keeps the position of
  the last line it sent, (step, kind) with a step's training line before its held-out line, in
  RUN/wandb.json and sends a line only past it:
        send(line)  iff  (line.step, kind_order[line.kind]) > last sent
  Steps rise monotonically in W&B, nothing is sent twice (a finished run's final evaluation, which
  the JSONL drops and writes again on a rerun, included), and the rows of steps s+1..last keep the
  values of the first attempt. Those equal the retrained ones (the resume is bitwise,
  docs/reliability.md) except for what measures the machine (tokens_per_s, mfu, memory).

Pitfalls: a SIGKILL can lose the last row (W&B sends a step's row when the next step arrives or at
``finish``); SIGTERM (Slurm's signal before a requeue) ends the loop through ``close`` and loses
nothing. Offline runs are files under RUN/wandb/ (or $WANDB_DIR): ``wandb sync RUN/wandb/offline-run-*``
uploads them, in order, into the one run.
"""
from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any, Optional

from ..atomic import atomic_write_text
from ..errors import ConfigError

log = logging.getLogger("archscale.train")

STATE_FILE = "wandb.json"  # RUN/wandb.json: {"id": W&B run id, "step": last sent, "kind": "train" | "eval"}
INSTALL = "pip install 'archscale[wandb]'"
KIND_ORDER = {"train": 0, "eval": 1}  # within a step the training line is written first (callbacks.py)


def require(cfg) -> None:
    """Refuse ``logging.wandb.enabled=true`` without the wandb package, in one line, before any work
    (train/trainer/loop.check). Looks for the package only (no import: a second or more)."""
    if cfg.logging.wandb.enabled and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"logging.wandb.enabled=true but wandb is not installed: {INSTALL} "
                          f"(or set logging.wandb.enabled=false)")


def read_state(root: Path) -> Optional[dict]:
    """RUN/wandb.json, or None (none yet, or unreadable: a new W&B run then)."""
    try:
        state = json.loads((Path(root) / STATE_FILE).read_text())
        return state if isinstance(state, dict) and state.get("id") else None
    except (OSError, ValueError):
        return None


def new_id() -> str:
    """A W&B run id: 8 characters of [a-z0-9] (W&B's own form; 36^8 ~ 2.8e12 ids per project)."""
    import secrets
    import string

    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


class WandbLogger:
    """The W&B run of one run directory (module docstring): ``log`` each metrics line, ``close`` at the end."""

    def __init__(self, run: Any, root: Path, state: dict):
        self.run, self.path, self.state = run, Path(root) / STATE_FILE, state
        self.skipped = 0

    @classmethod
    def open(cls, cfg, root: Path, config: dict, *, fresh: bool = False) -> "WandbLogger":
        """Start or continue the W&B run of run directory `root` with `cfg` (a WandbConfig) and the
        resolved `config`; `fresh`: a new W&B run even if RUN/wandb.json names one."""
        import os

        import wandb

        root = Path(root)
        state = None if fresh else read_state(root)
        if state is None:
            state = {"id": new_id(), "step": None, "kind": None}
            atomic_write_text(root / STATE_FILE, json.dumps(state) + "\n")  # before init: a kill keeps the id
        kwargs = dict(project=cfg.project, entity=cfg.entity or None, group=cfg.group or None,
                      name=cfg.name or root.resolve().name, tags=list(cfg.tags) or None, config=config,
                      id=state["id"], resume="allow", allow_val_change=True)
        if not os.environ.get("WANDB_DIR"):
            (root / "wandb").mkdir(parents=True, exist_ok=True)
            kwargs["dir"] = str(root)  # RUN/wandb/
        try:
            run = wandb.init(**kwargs)
        except Exception as e:  # no login, no network, a bad entity: one line, before the first step
            raise ConfigError(f"W&B could not start run {state['id']}: {' '.join(str(e).split())} "
                              f"(wandb login, or WANDB_MODE=offline, or logging.wandb.enabled=false)") from None
        return cls(run, root, state)

    def sent(self, step: int, kind: str) -> bool:
        """Whether the line (step, kind) is at or before the last line sent (module docstring)."""
        if self.state.get("step") is None:
            return False
        return (step, KIND_ORDER[kind]) <= (self.state["step"], KIND_ORDER[self.state["kind"]])

    def log(self, record: dict, kind: str) -> None:
        """Send one metrics.jsonl line (`kind`: callbacks.line_kind) at W&B step = its step, unless sent before."""
        step = int(record["step"])
        if self.sent(step, kind):
            self.skipped += 1
            return
        self.run.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=step)
        self.state.update(step=step, kind=kind)
        atomic_write_text(self.path, json.dumps(self.state) + "\n")

    def close(self) -> None:
        if self.skipped:
            log.info("W&B run %s: %d metrics lines of steps it already had were not sent again (a resume)",
                     self.state["id"], self.skipped)
        self.run.finish()


def open_run(t) -> Optional[WandbLogger]:
    """The trainer's W&B run (rank 0; None when logging.wandb is off)."""
    if not t.cfg.logging.wandb.enabled:
        return None
    from ..yamlfile import parse_yaml  # the one YAML reader (tests/test_yaml_load.py)

    return WandbLogger.open(t.cfg.logging.wandb, t.layout.root, parse_yaml(t.config_yaml, "the resolved config"),
                            fresh=t.cfg.checkpoint.resume == "never")


def grouping_overrides(group: str, name: str, config: Optional[str] = None) -> list[str]:
    """The ``logging.wandb`` overrides that compare, ladder and sweep put *before* a run's own: the
    group (their output directory's name; one W&B group per comparison) and the run's name (its
    directory below the output directory). Overrides given later (``--set``, a grid's, a cell's)
    win; so does a group set in the base `config` file (a sweep's), which is read to find out."""
    if config:
        try:
            from ..config import load_config  # light: dataclasses and yaml

            if load_config(config, []).logging.wandb.group:
                group = ""
        except Exception:  # a config the run's own check refuses, with its own message
            pass
    return ([f"logging.wandb.group={group}"] if group else []) + [f"logging.wandb.name={name}"]
