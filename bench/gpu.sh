#!/usr/bin/env bash
# The prepared GPU runs (H100/H200), one device call each, in order of importance (bench/README.md):
#   bash bench/gpu.sh score    ~8 min: ORT CUDA on the builder's fp16 and bf16 graphs and the dynamo fp16 graph (with
#                                     parity), PyTorch bf16 SDPA, the original's way
#   bash bench/gpu.sh train    ~5 min: the training recipe with --compile, 3 epochs of 4,118 articles
#   bash bench/gpu.sh export   ~7 min: the CLI's `export --dtype fp16 --device cuda` and `score --device cuda` on a
#                                     1.5B-shaped run (the product's path, where `score` measures the pieces)
#   bash bench/gpu.sh compile  ~5 min: what torch.compile and bigger batches add (optional)
# Arguments after the step go to its script (`bash bench/gpu.sh score --graphs dynamo,builder_bf16`).
# Each step runs under its own time limit and writes its JSON as it goes, so a step cut short still returns what
# it measured. Results and logs in $OUT (or bench-results/). Needs torch, transformers, peft, pyarrow on the
# machine; the rest comes from bench/device_wheels.sh (.whl/ and .whl-parts/, carried as bench/README.md says).
set -uo pipefail
step=${1:-score}
out=${OUT:-bench-results}
limit=${STEP_LIMIT_S:-520}  # with --kill-after's 20 s, inside the device call's 600 s
mkdir -p "$out"
site=$PWD/.whl-site  # ignored (with .whl/): a warm machine keeps it for the next call
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
fi
if ls .whl-parts/p*/*.part-* >/dev/null 2>&1 && ! ls "$site"/onnxruntime_gpu-*.dist-info >/dev/null 2>&1; then
  first=$(ls .whl-parts/p00/*.part-00)
  wheel=/tmp/$(basename "$first" .part-00)
  cat .whl-parts/p*/*.part-* > "$wheel"
  if echo "$(cat .whl-parts/sha256)  $wheel" | sha256sum -c -; then  # parts missing: the rest still measures
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$wheel"
  fi
fi
export PYTHONPATH="$PWD/src:$PWD/bench:$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 INVESTMENT_RISK_CACHE=/tmp/ir-cache HF_HUB_OFFLINE=1
# onnxruntime-gpu's CUDA provider links against cuBLAS, cuDNN and the CUDA runtime, which here come only with
# torch's nvidia packages, in a site-packages that onnxruntime (installed under .whl-site) does not search: name them.
nvidia_libs=$(python3 -c 'import glob, os, site
print(":".join(sorted({os.path.dirname(p) for s in site.getsitepackages() for p in glob.glob(s + "/nvidia/**/lib*.so*", recursive=True)})))' 2>/dev/null)
export LD_LIBRARY_PATH="${nvidia_libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
rm -f /tmp/ort-session-provider  # a warm machine's, from the last call: the probe below writes this call's
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  # A real session: with libraries missing, ONNX Runtime lists its CUDA provider yet runs on the CPU. Once without
  # torch (a CLI process that never imports it), once as the product starts it (OnnxRunner loads the libraries).
  python3 - <<'EOF'
import onnx, onnxruntime as ort
from onnx import TensorProto, helper
graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)  # ORT 1.31 reads IR <= 13
session = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
print("without torch: onnxruntime", ort.__version__, "session providers", session.get_providers())
from investment_risk.modeling.onnx_runtime import load_cuda_libraries
load_cuda_libraries(ort)
session = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
print("as the product starts it: session providers", session.get_providers())
open("/tmp/ort-session-provider", "w").write(session.get_providers()[0])
import importlib.util  # the model builder writes the decoder's fp16 graph (score, export)
print("onnxruntime-genai", "found" if importlib.util.find_spec("onnxruntime_genai") else "MISSING")
EOF
} 2>&1 | tee "$out/gpu-info-$step.txt"
# score and export measure ONNX Runtime CUDA: without it they would spend minutes and measure nothing of it.
if [[ ($step == score || $step == export) && ${BENCH_SMOKE:-0} != 1 ]] \
    && [[ "$(cat /tmp/ort-session-provider 2>/dev/null)" != CUDAExecutionProvider ]]; then
  echo "bench/gpu.sh: ONNX Runtime's CUDA provider does not start here (gpu-info-$step.txt); stopping before $step" >&2
  exit 3
fi
case $step in
  score) args=(bench/gpu_score.py --out "$out/gpu-score.json") ;;
  train) args=(bench/gpu_train.py --out "$out/gpu-train.json" --epochs 3 --compile --skip-step-loop) ;;
  export) args=(bench/gpu_export.py --out "$out/gpu-export.json") ;;
  compile) args=(bench/gpu_compile.py --out "$out/gpu-compile.json") ;;
  *) echo "bench/gpu.sh: step must be score, train, export or compile, not '$step'" >&2; exit 2 ;;
esac
limit=$(( limit - SECONDS ))  # what the installs and the probe took comes off the step, inside the call's limit
if (( limit < 30 )); then  # `timeout 0` would mean no limit at all, and a negative one an error
  echo "bench/gpu.sh: ${limit}s left of STEP_LIMIT_S after the installs: too little for $step" >&2
  exit 3
fi
timeout --signal=INT --kill-after=20 "$limit" python3 "${args[@]}" "${@:2}" 2>&1 | tee "$out/$step.log" | tail -60
