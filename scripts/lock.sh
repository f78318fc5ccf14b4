#!/usr/bin/env bash
# Refreshes requirements/cpu.lock: resolves archscale[test] afresh (the newest versions the package
# index has) in a throw-away venv and writes every installed version, transitive ones included.
#   bash scripts/lock.sh                 # then run the suite on it (bash scripts/test.sh) and commit the lock
# Use it when you want newer dependencies or change pyproject.toml's dependencies; nothing else
# changes the lock. torch keeps the lock's version; ARCHSCALE_TORCH=SPEC moves it (a CPU build). PYTHON picks the interpreter (the lock is for that Python version, CPU torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
lock=requirements/cpu.lock
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m venv "$tmp/venv"
pip=("$tmp/venv/bin/pip" install -q --disable-pip-version-check)
# torch stays at the lock's version (a CPU build) unless ARCHSCALE_TORCH names another: a bare
# `torch` resolves to the CUDA build and its nvidia-* libraries, which a CPU lock must not hold
torch=$(grep -m1 '^torch==' "$lock" 2>/dev/null || echo 'torch==2.13.0+cpu')
"${pip[@]}" "${ARCHSCALE_TORCH:-$torch}"
"${pip[@]}" -e ".[test]"
{
  echo "# Every package archscale[test] installs, at the versions the suite last passed with (CPU, Python"
  echo "# $("$tmp/venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])'), $(uname -m)). Written by scripts/lock.sh on $(date -u +%Y-%m-%d); do not edit by hand."
  echo "# scripts/setup.sh installs exactly these; ARCHSCALE_UNLOCKED=1 ignores them; ARCHSCALE_TORCH replaces the torch line."
  "$tmp/venv/bin/pip" freeze --all --exclude-editable --disable-pip-version-check | grep -v -e "^#" -e "^pip=="
} > "$lock.tmp"
mv "$lock.tmp" "$lock"
echo "wrote $lock ($(grep -vc '^#' "$lock") packages); run bash scripts/test.sh before committing it"
