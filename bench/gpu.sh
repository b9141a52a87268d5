#!/usr/bin/env bash
# One prepared GPU run (H100/H200): the training and scoring benchmarks, results in $OUT (or bench-results/).
# Needs torch, transformers, peft, pyarrow on the machine; structlog and python-docx may come as wheels in .whl/.
set -uo pipefail
out=${OUT:-bench-results}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:$PWD/bench:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 INVESTMENT_RISK_CACHE=/tmp/ir-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu-info.txt"
python3 bench/gpu_score.py --out "$out/gpu-score.json" 2>&1 | tail -40
python3 bench/gpu_train.py --out "$out/gpu-train.json" 2>&1 | tail -40
