# `make quickstart` and `make test` each set up .venv themselves on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install quickstart test test-fast bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

quickstart: install  ## train a small ViT on the bundled CIFAR-10 sample (CPU, offline, < 3 min)
	$(PY) train.py experiment=quickstart

test: install  ## the whole suite, slow end-to-end tests included (what CI runs)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install  ## unit tests only
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf outputs multirun .pytest_cache
