#!/usr/bin/env bash
# The main job: set up .venv if needed, then run a small CD:FLM / ND:PLM / ED:MLM comparison, 2 seeds each, on
# the embedded corpus (extra arguments go to `archscale compare`, e.g. a run directory).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TOKENIZERS_PARALLELISM=false
exec .venv/bin/archscale compare --seeds 2 "$@"
