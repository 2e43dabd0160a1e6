# The two commands a newcomer needs:  `make demo`  and  `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines pin torch to the CPU build (no GBs of CUDA wheels); with nvidia-smi present
# nothing is pinned so the CUDA build installs. Override with `make setup CONSTRAINTS=...`.
CONSTRAINTS ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,cluster/constraints-cpu.txt)
PIP_FLAGS := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)

.PHONY: setup demo test clean

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	@echo "==> creating $(VENV) and installing raychat[dev] ($(if $(CONSTRAINTS),constraints: $(CONSTRAINTS),no constraints))"
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q $(PIP_FLAGS) -e '.[dev]' 2>&1 | { grep -v 'is ignored: it is neither' || true; }
	touch $@

setup: $(VENV)/.installed  ## create the virtualenv with everything installed

demo: setup  ## sample data -> pretokenize -> train -> serve -> ask, on the embedded default
	$(PY) -m jobs.pipeline $(ARGS)

test: setup  ## unit + integration tests (real local Ray, moto S3 on loopback)
	$(PY) -m pytest $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
