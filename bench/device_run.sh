#!/usr/bin/env bash
# Run ON a lent GPU machine (the device tool), from the repository root, with .whl carried
# (made here by bench/device_wheels.sh).
#   check    THE ONE CALL (issue 30): bash bench/device_run.sh check [bench.check options]: GPU
#            tests, matmul peak, CD/ND/ED beside HF Llama/T5, attention, profile, in priority order,
#            within 540 s of this script's start (wheel install included); $OUT/check.json after
#            every item and row; `check --device cpu` is the CPU mode (tests/test_device_check.py)
# The older steps, each well inside one call's 10 minutes (a session has 15 minutes of device time):
#   tests    the GPU-only tests (bf16 vs fp32 reference, compile, no host sync, fused loss)
#   kernels  python -m bench --only attention hf: matmul peak, attention kernels, HF anchors
#   cd       the CD:FLM rows (compiled, eager, selective checkpointing)
#   nded     the ND:PLM row and ED:MLM at CD's parameters (1024/1024)
#   ed       ED:MLM at the reference 512/114 and at HF T5's shape
#   profile  python -m bench --profile: top kernels and time shares of CD, ND and ED steps
# Usage: bash bench/device_run.sh STEP [STEP ...]. One step per call (each compiles for minutes;
# a call is cut at 10), calls back to back so the warm machine keeps its compile cache in /tmp:
# tests, kernels, cd, nded, ed, profile. Logs and bench_<step>.json land in $OUT (./device_out
# without the device tool; the JSON is rewritten after every row, so a cut call still returns
# what it measured); join them here with `python -m bench --merge bench_*.json`.
set -uo pipefail
T0=$(date +%s.%N)  # bench.check's deadline runs from here: the wheel install counts
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ] && ! "$PY" -c "import deepspeed" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "error: installing the carried wheels in .whl failed" >&2; exit 2; }
fi
"$PY" -c "import deepspeed" \
  || { echo "error: deepspeed does not import: run bash bench/device_wheels.sh here and carry .whl" >&2; exit 2; }
echo "[device_run] wheels ready after $(awk "BEGIN{printf \"%.0f\", $(date +%s.%N) - $T0}") s"
if [ "${1:-}" = check ]; then  # one call: bench.check keeps its own deadline; the rest of the line is its options
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -m bench.check --started "$T0" --json "$OUT/check.json" "${@:2}" 2>&1 | tee "$OUT/check.log"
  exit "${PIPESTATUS[0]}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
steps=("$@"); [ ${#steps[@]} -eq 0 ] && { echo "error: name the steps: check, or tests kernels cd nded ed profile" >&2; exit 2; }
rc=0
for s in "${steps[@]}"; do
  case "$s" in
    tests)   "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_loss.py 2>&1 \
               | tee "$OUT/gpu_tests.log" || rc=1 ;;
    kernels) "$PY" -m bench --only attention hf --json "$OUT/bench_kernels.json" 2>&1 | tee "$OUT/bench_kernels.log" || rc=1 ;;
    cd)      "$PY" -m bench --only models --models "CD:FLM,CD:FLM eager,CD:FLM selective AC" \
               --json "$OUT/bench_cd.json" 2>&1 | tee "$OUT/bench_cd.log" || rc=1 ;;
    nded)    "$PY" -m bench --only models --models "ND:PLM,ED:MLM" \
               --json "$OUT/bench_nded.json" 2>&1 | tee "$OUT/bench_nded.log" || rc=1 ;;
    ed)      "$PY" -m bench --only models --models "ED:MLM 512/114,ED:MLM T5 shape" \
               --json "$OUT/bench_ed.json" 2>&1 | tee "$OUT/bench_ed.log" || rc=1 ;;
    profile) "$PY" -m bench --profile "$OUT" --models "CD:FLM,ND:PLM,ED:MLM" 2>&1 | tee "$OUT/profile.log" || rc=1 ;;
    *) echo "error: unknown step '$s' (tests, kernels, cd, nded, ed, profile)" >&2; exit 2 ;;
  esac
done
exit $rc
