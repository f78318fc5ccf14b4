#!/usr/bin/env bash
# Creates .venv (once) and installs archscale with its dependencies into it.
#
# By default every package comes at the version in requirements/cpu.lock, the set the suite last
# passed with (CPU torch, Python 3.11); scripts/lock.sh refreshes that file.
#   ARCHSCALE_UNLOCKED=1   ignore the lock: the newest versions pyproject.toml allows
#   ARCHSCALE_TORCH=SPEC   install this torch instead of the lock's (a GPU machine: the CUDA build of
#                          your choice, e.g. ARCHSCALE_TORCH=torch==2.13.0); every other pin is kept
# It reinstalls only when pyproject.toml, the lock or these variables changed since the last run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
lock=requirements/cpu.lock
pip=(.venv/bin/pip install -q --disable-pip-version-check)
unlocked=${ARCHSCALE_UNLOCKED:-0}
case "$unlocked" in 0|1) ;; *) echo "error: ARCHSCALE_UNLOCKED=$unlocked; set it to 1 (newest versions) or 0 (the lock)" >&2; exit 2;; esac
if [ "$unlocked" = 0 ] && [ ! -f "$lock" ]; then
  echo "error: $lock is missing; restore it from git, write it with bash scripts/lock.sh, or set ARCHSCALE_UNLOCKED=1" >&2
  exit 2
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# what this install is: the mode, the torch spec and the lock's content (a changed one reinstalls)
want="unlocked=$unlocked torch=${ARCHSCALE_TORCH:-lock} lock=$(cksum < "$lock" 2>/dev/null || echo none)"
stamp=.venv/.archscale-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  if [ "$unlocked" = 1 ]; then
    "${pip[@]}" "${ARCHSCALE_TORCH:-torch==2.13.0}"
    "${pip[@]}" -e ".[test]"
  else
    pins=.venv/.archscale-pins.txt
    if [ -n "${ARCHSCALE_TORCH:-}" ]; then
      grep -v '^torch==' "$lock" > "$pins"  # the other pins stay; torch is the one asked for
      "${pip[@]}" "$ARCHSCALE_TORCH"
    else
      cp "$lock" "$pins"
    fi
    # -c: pyproject's requirements, each at its locked version (a dependency missing from the lock
    # still installs, unpinned: refresh the lock then)
    "${pip[@]}" -r "$pins" -c "$pins" -e ".[test]"
  fi
  echo "$want" > "$stamp"
fi
