# Two commands do all the setup: `make run` (the main job) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
ARGS   ?=

.PHONY: setup run test browser clean

setup: $(VENV)/.installed

# torch and torchvision first, pinned to the pair that ships together
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	touch $@

run: setup
	$(PY) -m flows.train_cifar $(ARGS)

test: setup browser
	$(PY) -m pytest $(ARGS)

# the UI test drives a real headless browser: Debian's chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the UI test"; \
	  $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium; }

clean:
	rm -rf $(VENV) .pytest_cache

# Prefect server, worker and deployments (README.md, "Run it in production"). The pool names
# match deployments/prefect.yaml.
PREFECT     := $(VENV)/bin/prefect
SERVER_HOST ?= 127.0.0.1
SERVER_PORT ?= 4200
PREFECT_API_URL ?= http://$(SERVER_HOST):$(SERVER_PORT)/api
LOCAL_POOL  := train-cifar-local
GPU_POOL    := train-cifar-gpu
DEPLOY_ARGS ?= --name local

.PHONY: server worker deploy

# the API and UI on http://127.0.0.1:4200 (SQLite under ~/.prefect); Ctrl-C stops it
server: setup
	$(PREFECT) server start --host $(SERVER_HOST) --port $(SERVER_PORT)

# a process worker: runs train-cifar/local flow runs on this machine; Ctrl-C stops it
worker: setup
	PREFECT_API_URL=$(PREFECT_API_URL) $(PREFECT) worker start --pool $(LOCAL_POOL) --type process

# pools, then deployments. `make deploy DEPLOY_ARGS=--all` also builds and pushes
# the GPU image and applies train-cifar/nightly (needs Docker and a registry login).
deploy: setup
	@export PREFECT_API_URL=$(PREFECT_API_URL); set -e; \
	$(PREFECT) work-pool inspect $(LOCAL_POOL) >/dev/null 2>&1 || \
	  $(PREFECT) work-pool create $(LOCAL_POOL) --type process; \
	if $(PREFECT) work-pool inspect $(GPU_POOL) >/dev/null 2>&1; then \
	  $(PREFECT) work-pool update $(GPU_POOL) --base-job-template deployments/gpu-job-template.json; \
	else \
	  $(PREFECT) work-pool create $(GPU_POOL) --type kubernetes --base-job-template deployments/gpu-job-template.json; \
	fi; \
	$(PREFECT) deploy --prefect-file deployments/prefect.yaml $(DEPLOY_ARGS)
