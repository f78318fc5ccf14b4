#!/usr/bin/env bash
# Creates .venv (once) and installs archscale with its dependencies into it.
# CPU machines: torch==2.13.0 is the local CPU build; set ARCHSCALE_TORCH to choose another torch spec.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.archscale-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --disable-pip-version-check "${ARCHSCALE_TORCH:-torch==2.13.0}"
  .venv/bin/pip install -q --disable-pip-version-check -e ".[test]"
  touch "$stamp"
fi
