#!/usr/bin/env bash
# One prepared GPU run (H100/H200), about 12 minutes: scoring (ORT CUDA on our export, PyTorch bf16 SDPA, the
# original's way), torch.compile, and the training recipe with --compile for 3 epochs of 4,118 articles.
# Results in $OUT (or bench-results/). Needs torch, transformers, peft, pyarrow on the machine; the rest comes from
# bench/device_wheels.sh (.whl/ and .whl-parts/, carried as bench/README.md says).
set -uo pipefail
out=${OUT:-bench-results}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
if ls .whl-parts/p*/*.part-* >/dev/null 2>&1; then  # onnxruntime-gpu, joined from the parts the earlier calls left
  first=$(ls .whl-parts/p00/*.part-00)
  wheel=/tmp/$(basename "$first" .part-00)
  cat .whl-parts/p*/*.part-* > "$wheel"
  echo "$(cat .whl-parts/sha256)  $wheel" | sha256sum -c - || exit 1
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheel"
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:$PWD/bench:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 INVESTMENT_RISK_CACHE=/tmp/ir-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu-info.txt"
python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())" | tee -a "$out/gpu-info.txt"
python3 bench/gpu_score.py --out "$out/gpu-score.json" 2>&1 | tail -60
python3 bench/gpu_compile.py --out "$out/gpu-compile.json" 2>&1 | tail -20
python3 bench/gpu_train.py --out "$out/gpu-train.json" --epochs 3 --compile --skip-step-loop 2>&1 | tail -40
