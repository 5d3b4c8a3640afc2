# fdh-beam: `make demo` runs the rebuild end to end offline; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
EXTRAS ?= gcp,models,lite,demo,test
DEMO_OUT ?= demo_out

.PHONY: all venv test test-fast demo bench clean

all: test

# The environment is rebuilt when setup.py changes; the stamp file records the last install.
$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel setuptools
	$(PIP) install -q -e '.[$(EXTRAS)]'
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q tests

test-fast: venv
	$(PY) -m pytest -q -x -m "not slow" tests

demo: venv
	$(PY) -m beam_jobs.demo --output=$(DEMO_OUT)

bench: venv
	$(PY) bench/run_all.py

clean:
	rm -rf $(DEMO_OUT) bench_out .pytest_cache
