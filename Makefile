# fdh-beam: `make demo` runs the rebuild end to end offline; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
EXTRAS ?= gcp,models,lite,demo,test
DEMO_OUT ?= demo_out

BENCH_VENV ?= .venv-bench
# The demo needs only the lite annotator and the plotting libraries: a venv of its own, no torch.
DEMO_VENV ?= .venv-demo

.PHONY: all venv demo-venv test test-fast lint-imports demo bench clean

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

# The fast tier: pure-core tests only (no Beam pipeline, job or emulator; < 60 s on 2 cores).
test-fast: venv
	$(PY) -m pytest -q -x -m unit tests

lint-imports: venv
	$(VENV)/bin/lint-imports

$(DEMO_VENV)/.installed: setup.py
	$(PYTHON) -m venv $(DEMO_VENV)
	$(DEMO_VENV)/bin/pip install -q --upgrade pip wheel setuptools
	$(DEMO_VENV)/bin/pip install -q -e '.[demo]'
	touch $@

demo-venv: $(DEMO_VENV)/.installed

demo: demo-venv
	$(DEMO_VENV)/bin/python -m beam_jobs.demo --output=$(DEMO_OUT)
	@du -sh $(DEMO_VENV) | sed 's/^/demo environment: /'

# img2dataset (the fetch benchmark's baseline) pins old dependencies: it gets a venv of its own.
$(BENCH_VENV)/.installed:
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q img2dataset==1.47.0
	touch $@

bench: venv $(BENCH_VENV)/.installed
	$(PY) bench/run_all.py

clean:
	rm -rf $(DEMO_OUT) bench_out .pytest_cache
