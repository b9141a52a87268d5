# investment-risk — every target sets up what it needs from nothing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU build of torch (it lies on this kind of machine; a CUDA image would take a CUDA build instead).
TORCH_CPU ?= torch==2.13.0
PYTEST_ARGS ?=
# checkov pins an old `packaging` that pytest cannot use, so it gets a venv of its own.
CHECKOV_VENV := .venv-checkov
CHECKOV_VERSION ?= 3.3.30
# make train-job / score-job parameters (paths are as the pods see them: /data and /models are the PVCs).
IMAGE ?= ghcr.io/investment-risk/investment-risk:0.1.0
MODE ?= distillation
DATA ?= /data/splits/latest
BASE_MODEL ?= qwen2.5-1.5b
MODEL ?= /models/current
INPUT ?= /data/incoming
SHARDS ?= 4
PROFILE ?= gpu
NAMESPACE ?= investment-risk
JOB_ARGS ?= --wait
# Optional: NAME names the Job; OUT continues an earlier one (train resumes that run directory, score skips its
# finished shards, export writes there). export-job needs RUN, the training run directory.
NAME ?=
OUT ?=
RUN ?=
JOB_NAMING = $(if $(NAME),--name $(NAME)) $(if $(OUT),--out $(OUT))

.PHONY: install demo test gpu-smoke test-large bench bench-learning bench-instruction chaos clean k8s lock image image-test engine-stop train-job export-job score-job

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Tests run the image's ONNX Runtime version (its onnxruntime-gpu has the same Python tools and CPU provider):
# converters and quantisers differ between releases, and the image is what ships.
IMAGE_ORT := $(shell sed -n 's/^onnxruntime-gpu==\([0-9.]*\).*/\1/p' docker/requirements.lock)
# Likewise the model builder that writes a decoder's GPU graph: the image's onnxruntime-genai-cuda version.
IMAGE_GENAI := $(shell sed -n 's/^onnxruntime-genai-cuda==\([0-9.]*\).*/\1/p' docker/requirements.lock)

$(VENV)/.installed: pyproject.toml docker/requirements.lock | $(BIN)/python
	$(BIN)/python -m pip install --quiet "$(TORCH_CPU)"
	$(BIN)/python -m pip install --quiet -e ".[test,cpu]" "onnxruntime==$(IMAGE_ORT)" "onnxruntime-genai==$(IMAGE_GENAI)"
	touch $@

$(CHECKOV_VENV)/.installed:
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install --quiet "checkov==$(CHECKOV_VERSION)"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/investment-risk demo --out demo-output

# checkov (the manifests' policy check) is a test tool only: the demo and the benches do without it.
test: install $(CHECKOV_VENV)/.installed
	sh tools/test-deps.sh
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -n 2 --dist worksteal $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/cpu_train.py
	$(BIN)/python bench/cpu_score.py

bench-learning: install
	bash bench/learning.sh

bench-instruction: install
	bash bench/instruction.sh

k8s: install
	$(BIN)/python tools/render_k8s_base.py

# The image's hash-checked lock: torch and onnxruntime-gpu on one CUDA stack, for Debian trixie's Python 3.13 on x86_64 Linux.
lock: install
	$(BIN)/python -m pip install --quiet uv
	$(BIN)/uv pip compile pyproject.toml --extra gpu --python-version 3.13 --python-platform x86_64-manylinux_2_28 \
		--generate-hashes --no-header -o docker/requirements.lock

# The image: built here (no registry: the base is made from Debian's packages) or anywhere. Behind a TLS proxy the
# extra CA bundle goes to the build as a BuildKit secret; by default the one pip here is told to trust, if any.
IMAGE_CA_BUNDLE ?= $(or $(PIP_CERT),$(SSL_CERT_FILE))
image:
	IMAGE=$(IMAGE) IMAGE_CA_BUNDLE=$(IMAGE_CA_BUNDLE) sh docker/build-image.sh

# The device scripts (bench/gpu.sh) run through on the CPU with a tiny model: before a device session, after a change
# to bench/ or to what it calls.
gpu-smoke: install
	$(BIN)/python -m pytest -m gpu_smoke -v $(PYTEST_ARGS)

# Graphs over protobuf's 2 GB limit (a Qwen2.5-1.5B export's path): about 3 minutes and 3 GB of disk.
test-large: install
	$(BIN)/python -m pytest -m large -v $(PYTEST_ARGS)

# The image run as the pods run it (read-only root, user 10001, no capabilities, no network), from the host.
image-test: install
	sh docker/engine.sh
	IMAGE=$(IMAGE) $(BIN)/python -m pytest -m image -v $(PYTEST_ARGS)

# Stop a dockerd that `make image` started.
engine-stop:
	-kill $$(cat /tmp/investment-risk-dockerd.pid) && rm -f /tmp/investment-risk-dockerd.pid

train-job: install
	$(BIN)/investment-risk jobs submit train --image $(IMAGE) --namespace $(NAMESPACE) --profile $(PROFILE) \
		--mode $(MODE) --data $(DATA) --base-model $(BASE_MODEL) $(JOB_NAMING) $(JOB_ARGS)

export-job: install
	$(BIN)/investment-risk jobs submit export --image $(IMAGE) --namespace $(NAMESPACE) --profile $(PROFILE) \
		--run $(or $(RUN),$(error RUN=/models/runs/NAME is required: the training run to export)) $(JOB_NAMING) $(JOB_ARGS)

score-job: install
	$(BIN)/investment-risk jobs submit score --image $(IMAGE) --namespace $(NAMESPACE) --profile $(PROFILE) \
		--model $(MODEL) --input $(INPUT) --shards $(SHARDS) $(JOB_NAMING) $(JOB_ARGS)

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) build dist *.egg-info src/*.egg-info .pytest_cache

# Fault injection: SIGKILL the scorer at random moments and commit points, rerun, check exactly-once (about 20 min).
CHAOS_CYCLES ?= 200
chaos: install
	$(BIN)/python -m tests.chaos --cycles $(CHAOS_CYCLES) --out bench-results/chaos.json
