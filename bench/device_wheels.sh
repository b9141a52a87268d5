#!/usr/bin/env bash
# Prepare, here, what the GPU device machine lacks for bench/gpu.sh: onnxruntime-gpu (about 256 MB, more than the
# 64 MiB one device call carries) split into parts of 56 MiB (with the working tree, under the 64 MiB a call carries), one folder a call, and the smaller wheels
# in .whl/ (onnxruntime-genai-cuda, whose model builder writes the decoder's fp16 graph, is the largest: about 17 MB).
# Versions come from the image's lock. See bench/README.md for the calls that carry and join them.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
grep -qx '/.whl-parts/' .git/info/exclude 2>/dev/null || echo '/.whl-parts/' >> .git/info/exclude
pin() { grep -oP "^$1==\K[^ ;\\\\]+" docker/requirements.lock; }
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
fetch() {  # DIR SPEC...
  local dir=$1; shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$dir" "$@"
}
rm -rf .whl .whl-parts && mkdir -p .whl .whl-parts
fetch .whl "onnxscript==$(pin onnxscript)" "onnx-ir==$(pin onnx-ir)" "structlog==$(pin structlog)" \
  "python-docx==$(pin python-docx)" "ml-dtypes==$(pin ml-dtypes)" "onnxruntime-genai-cuda==$(pin onnxruntime-genai-cuda)"
tmp=$(mktemp -d)
fetch "$tmp" "onnxruntime-gpu==$(pin onnxruntime-gpu)"
wheel=$(ls "$tmp"/onnxruntime_gpu-*.whl)
split -b 56M -d -a 2 "$wheel" "$tmp/part-"
for part in "$tmp"/part-*; do
  n=${part##*-}
  mkdir -p ".whl-parts/p$n"
  mv "$part" ".whl-parts/p$n/$(basename "$wheel").part-$n"
done
sha256sum "$wheel" | awk '{print $1}' > .whl-parts/sha256
rm -rf "$tmp"
du -sh .whl .whl-parts/p* | sed 's/^/  /'
echo "carry .whl-parts/pNN (one a call), then .whl and .whl-parts/sha256 with bench/gpu.sh: see bench/README.md"
