# aeserve — the two commands that matter are `make serve` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8000
# 127.0.0.1: reachable from this machine only; `HOST=0.0.0.0 make serve` listens on every interface
# (set AESERVE_API_TOKEN then). The container (Dockerfile, docker-compose.yml) binds 0.0.0.0.
HOST ?= 127.0.0.1
STORE ?= model_store
# The CPU torch wheel (dev, CI); the Docker image installs the CUDA build instead.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= cpu,train,dev

.PHONY: install serve test store lint bench bench-quick clean-store help

help:
	@echo "make serve   - install, build the default model store if missing, start the service on HOST:PORT ($(HOST):$(PORT));"
	@echo "               HOST=0.0.0.0 make serve listens on every interface"
	@echo "make test    - install and run the whole test suite"
	@echo "make store   - (re)build the default model store"
	@echo "make bench   - in-process vs served throughput table"
	@echo "make lint    - ruff + hadolint"

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]" "$(TORCH_SPEC)"
	touch $@

install: $(VENV)/.installed

# The tests also exercise the (heavy, optional) abTEM simulator that made the committed 4D-STEM data.
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[$(EXTRAS),stem]" "$(TORCH_SPEC)"
	touch $@

$(STORE)/.built: $(VENV)/.installed
	$(PY) -m training build-store --store $(STORE) --if-missing
	touch $@

store: $(VENV)/.installed
	$(PY) -m training build-store --store $(STORE)
	touch $(STORE)/.built

serve: $(STORE)/.built
	AESERVE_STORE=$(STORE) $(PY) -m uvicorn app.main:create_app --factory --host $(HOST) --port $(PORT)

test: $(VENV)/.installed-test
	$(PY) -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check app training tests bench
	$(VENV)/bin/hadolint Dockerfile

bench: $(STORE)/.built
	$(PY) -m bench.throughput --store $(STORE)
	$(PY) -m bench.diffusion_batching --store $(STORE)

clean-store:
	rm -rf $(STORE)/*/ $(STORE)/.built
