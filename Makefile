# Two commands do all the setup: `make run` (the main job) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
ARGS   ?=

.PHONY: setup run test browser clean

setup: $(VENV)/.installed

# torch and torchvision first, pinned to the pair that ships together; everything else
# at the versions CI tested (constraints.txt, which the image uses too)
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

run: setup
	$(PY) -m flows.train_cifar $(ARGS)

# The suite on TEST_WORKERS pytest-xdist workers. Most of its time is spent waiting on
# servers, workers and browsers, so more workers than cores pays (README.md, Tests).
# --dist loadgroup: the tests of a module that share a server or cluster stay on one worker
# in their order (tests/conftest.py schedules the groups), every other test goes to the next free
# worker; --no-loadscope-reorder keeps conftest's order: the longest modules first.
TEST_WORKERS ?= 5
test: setup browser
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder --durations=25 $(ARGS)

# the UI test drives a real headless browser: Debian's chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the UI test"; \
	  $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium; }

clean:
	rm -rf $(VENV) .pytest_cache

# Prefect server, workers and deployments (README.md, "Run it in production" and
# "Across machines"). The pool names match deployments/prefect.yaml.
PREFECT     := $(VENV)/bin/prefect
SERVER_HOST ?= 127.0.0.1
SERVER_PORT ?= 4200
PREFECT_API_URL ?= http://$(SERVER_HOST):$(SERVER_PORT)/api
LOCAL_POOL  := train-cifar-local
VARIANT_POOL := train-cifar-local-variants
CPU_POOL    := train-cifar-cpu
GPU_POOL    := train-cifar-gpu
DEPLOY_ARGS ?= --name train-cifar/local --name train-variant/local
STORE       ?= $(CURDIR)/artifacts

.PHONY: server worker variant-worker deploy fanout

# the API and UI on http://127.0.0.1:4200 (SQLite under ~/.prefect); Ctrl-C stops it
server: setup
	$(PREFECT) server start --host $(SERVER_HOST) --port $(SERVER_PORT)

# a process worker: runs train-cifar/local flow runs on this machine; Ctrl-C stops it.
# deployments/worker.py is Prefect's process worker with one change: a killed run's
# crash is reported once, so that a run retried at once is not marked Crashed again
worker: setup
	PREFECT_API_URL=$(PREFECT_API_URL) $(VENV)/bin/python deployments/worker.py --pool $(LOCAL_POOL)

# a process worker for train-variant/local: one variant at a time, like one GPU node.
# Start several (each in its own terminal) to train variants side by side.
variant-worker: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH PREFECT_API_URL=$(PREFECT_API_URL) \
	  $(VENV)/bin/python deployments/worker.py --pool $(VARIANT_POOL) --limit 1

# pools, then deployments. `make deploy DEPLOY_ARGS=--all` also builds and pushes
# the image and applies train-cifar/nightly and train-variant/gpu (needs Docker and
# a registry login). The automations: deployments/add_automations.py.
deploy: setup
	@export PREFECT_API_URL=$(PREFECT_API_URL); set -e; \
	for pool in $(LOCAL_POOL) $(VARIANT_POOL); do \
	  $(PREFECT) work-pool inspect $$pool >/dev/null 2>&1 || $(PREFECT) work-pool create $$pool --type process; \
	done; \
	for kind in cpu gpu; do \
	  pool=train-cifar-$$kind; template=deployments/$$kind-job-template.json; \
	  if $(PREFECT) work-pool inspect $$pool >/dev/null 2>&1; then \
	    $(PREFECT) work-pool update $$pool --base-job-template $$template; \
	  else \
	    $(PREFECT) work-pool create $$pool --type kubernetes --base-job-template $$template; \
	  fi; \
	done; \
	$(PREFECT) deploy --prefect-file deployments/prefect.yaml $(DEPLOY_ARGS)

# the local deployment with each variant as its own flow run on the variant workers
# (`make server`, `make worker` and `make variant-worker` running, `make deploy` done)
fanout: setup
	PREFECT_API_URL=$(PREFECT_API_URL) $(PREFECT) deployment run train-cifar/local --watch \
	  -p variant_deployment=train-variant/local -p store=$(STORE) $(ARGS)
