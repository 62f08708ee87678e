# Two commands do all the setup: `make run` (the main job) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
ARGS   ?=

.PHONY: setup run test clean

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

test: setup
	$(PY) -m pytest $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
