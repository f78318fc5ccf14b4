#!/usr/bin/env bash
# Run HERE (a machine with the package registries) before a GPU session: puts into .whl/ the
# wheels the lent GPU machine's image lacks (it has torch, transformers, accelerate, triton; no
# deepspeed, datasets or liger-kernel, and no registry). bench/device_run.sh installs them there.
#   bash bench/device_wheels.sh            # then carry ".whl" with the device call
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.whl/' >> .git/info/exclude; }
mkdir -p .whl
# the image's Python is 3.12 on x86-64
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux1_x86_64 --platform any)
ver() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
[ -e .whl/deepspeed-"$(ver deepspeed)"-py3-none-any.whl ] || "$PY" -m pip wheel -q --no-deps -w .whl "deepspeed==$(ver deepspeed)"
# typing-extensions: pydantic 2.14 needs a newer one than the image may hold
for pkg in hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions datasets dill multiprocess; do
  "$PY" -m pip download -q --no-deps "${plat[@]}" -d .whl "$pkg==$(ver "$pkg")"
done
"$PY" -m pip download -q --no-deps "${plat[@]}" -d .whl "liger-kernel==${LIGER_VERSION:-0.8.5}"
du -sh .whl && ls .whl
