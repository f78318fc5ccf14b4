#!/usr/bin/env bash
# Run ON a lent GPU machine (the device tool), from the repository root, with .whl carried
# (made here by bench/device_wheels.sh). One call does the GPU work of issue 8 in order:
#   tests    the GPU-only tests (bf16 vs fp32 reference, compile, no host sync, fused loss)
#   bench    python -m bench: the table against the anchors, JSON to $OUT/bench.json
#   profile  python -m bench --profile: top kernels of each architecture's training step
# Usage: bash bench/device_run.sh [tests] [bench] [profile]   (default: all three)
# Every log lands in $OUT (or ./device_out without the device tool).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ] && ! python3 -c "import deepspeed" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "error: installing the carried wheels in .whl failed" >&2; exit 2; }
fi
python3 -c "import deepspeed, datasets" 2>/dev/null \
  || { echo "error: deepspeed/datasets missing: run bash bench/device_wheels.sh here and carry .whl" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
steps=("$@"); [ ${#steps[@]} -eq 0 ] && steps=(tests bench profile)
rc=0
for s in "${steps[@]}"; do
  case "$s" in
    tests)   python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_loss.py 2>&1 \
               | tee "$OUT/gpu_tests.log" || rc=1 ;;
    bench)   python3 -m bench --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" || rc=1 ;;
    profile) python3 -m bench --profile "$OUT" 2>&1 | tee "$OUT/profile.log" || rc=1 ;;
    *) echo "error: unknown step '$s' (tests, bench, profile)" >&2; exit 2 ;;
  esac
done
exit $rc
