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
# The CPU torch wheel (dev, CI); the Docker images install the same version (CPU build in Dockerfile, CUDA 13.0
# build in Dockerfile.gpu; tests/test_images.py keeps them equal).
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= cpu,train,dev

.PHONY: install serve test store lint bench bench-quick clean-store help ray-serve dashboard

help:
	@echo "make serve   - install, build the default model store if missing, start the service on HOST:PORT ($(HOST):$(PORT));"
	@echo "               HOST=0.0.0.0 make serve listens on every interface"
	@echo "make test    - install and run the whole test suite"
	@echo "make store   - (re)build the default model store"
	@echo "make bench   - engine ceiling, aeserve vs plain FastAPI / LitServe / PyTriton, cold start, RSS: the speed goals"
	@echo "make quality - held-out quality of every model next to equal-size baselines (writes metrics.heldout)"
	@echo "make soak    - a long overload run against a real process (SOAK_SECONDS, SOAK_FACTOR, ...)"
	@echo "make lstm-demo - the droplet LSTM viscosity pipeline against a running service"
	@echo "make ray-serve - the service on a local Ray cluster (Ray Serve): RAY_REPLICAS replicas of RAY_CPUS CPUs"
	@echo "make dashboard - render docs/dashboard.png from a live scrape (service + Prometheus + 90 s of traffic)"
	@echo "make lint    - ruff + hadolint"

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]" "$(TORCH_SPEC)"
	touch $@

install: $(VENV)/.installed

# The tests also exercise the (heavy, optional) abTEM simulator that made the committed 4D-STEM data, and Ray Serve.
$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install -q -e ".[$(EXTRAS),stem,ray]" "$(TORCH_SPEC)"
	touch $@

$(STORE)/.built: $(VENV)/.installed
	$(PY) -m training build-store --store $(STORE) --if-missing
	touch $@

store: $(VENV)/.installed
	$(PY) -m training build-store --store $(STORE)
	touch $(STORE)/.built

# `python -m app`: uvicorn with the access log off (AESERVE_ACCESS_LOG=true for a line per request).
serve: $(STORE)/.built
	AESERVE_STORE=$(STORE) $(PY) -m app --host $(HOST) --port $(PORT)

test: $(VENV)/.installed-test
	$(PY) -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

# make ray-serve: the service on a new local Ray cluster (Ray Serve), RAY_REPLICAS replicas of RAY_CPUS CPUs on HOST:PORT.
RAY_REPLICAS ?= 2
RAY_CPUS ?= 1
ray-serve: $(STORE)/.built
	$(PY) -m pip install -q -e ".[$(EXTRAS),ray]" "$(TORCH_SPEC)"
	$(PY) -m deploy.ray_serve --store $(STORE) --replicas $(RAY_REPLICAS) --num-cpus $(RAY_CPUS) --host $(HOST) --port $(PORT) $(RAY_ARGS)

# make dashboard: the Grafana dashboard's panels rendered from a live Prometheus scrape (needs the prometheus binary).
dashboard: $(STORE)/.built
	$(PY) -m deploy.render_dashboard --store $(STORE) --out docs/dashboard.png

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check app training tests bench examples aeserve_client deploy
	$(VENV)/bin/hadolint Dockerfile Dockerfile.gpu

# Engine ceiling, aeserve (cold start, RSS, C=1/8/32/64) and its peers, the goals of issue 8; <= 15 min on 2 cores.
# Peers: plain FastAPI; LitServe (the bench extra); PyTriton (its own venv, bench/.venv-triton, built once).
# bench-quick: 1 s windows, the peers that are installed.
bench: $(STORE)/.built
	$(PY) -m pip install -q -e ".[$(EXTRAS),bench]" "$(TORCH_SPEC)"
	$(PY) -m bench.peers.triton_env --if-missing || echo "no PyTriton peer on this machine"
	$(PY) -m bench.suite --store $(STORE) $(BENCH_ARGS)

bench-quick: $(STORE)/.built
	$(PY) -m bench.suite --store $(STORE) --quick $(BENCH_ARGS)

clean-store:
	rm -rf $(STORE)/*/ $(STORE)/.built

# make soak: the overload test (tests/app/test_overload_server.py) for longer, by tests/soak/overload.py:
# the tiny store with every engine run slowed by SOAK_RUN_MS and SOAK_INFLIGHT requests admitted, its
# capacity measured, then an open-loop flood at SOAK_FACTOR x capacity for SOAK_SECONDS. Prints req/s,
# status counts, p50/p99 of the 200s and 429s, and the server's RSS at start/peak/end; fails on any
# answer but 200/429, or when the service does not recover. Defaults: SOAK_SECONDS=120 SOAK_FACTOR=5
# SOAK_RUN_MS=40 SOAK_INFLIGHT=8, e.g. `SOAK_SECONDS=600 make soak`; the service inherits the environment
# (MALLOC_ARENA_MAX=2 flattens the steps in which glibc's per-thread arenas grow its RSS).
.PHONY: soak
soak: $(VENV)/.installed
	$(PY) -m tests.soak.overload

# make lstm-demo: the droplet LSTM viscosity pipeline (issue 9) end to end: builds LSTM_MODEL into STORE if
# missing, starts the service over STORE on 127.0.0.1:LSTM_PORT, runs `python -m examples.lstm_viscosity`
# against it (prints the R² table: LSTM on latents, LSTM on raw frames, physics baseline), stops the service.
# LSTM_ARGS passes more options, e.g. LSTM_ARGS="--train 48 --heldout 24 --frames 16".
LSTM_MODEL ?= v3-droplet-201
LSTM_PORT ?= 8765
.PHONY: lstm-demo
lstm-demo: $(VENV)/.installed
	$(PY) -m training build-store --store $(STORE) --if-missing --only $(LSTM_MODEL)
	AESERVE_STORE=$(STORE) $(PY) -m app --host 127.0.0.1 --port $(LSTM_PORT) --log-level warning & \
		server=$$!; trap "kill $$server" EXIT; \
	$(PY) -m examples.lstm_viscosity --url http://127.0.0.1:$(LSTM_PORT) --model $(LSTM_MODEL) $(LSTM_ARGS)

# make quality: the held-out quality report of the store (training/quality): every model's store artifacts on
# data no training run reads, next to equal-size baselines (bicubic thumbnail, PCA/NMF), with the goals (PASS/MISS);
# prints the table, writes reports/quality/quality.json + one PNG per model and each manifest's metrics.heldout.
.PHONY: quality
quality: $(STORE)/.built
	$(PY) -m training evaluate --store $(STORE) --out reports/quality $(QUALITY_ARGS)
