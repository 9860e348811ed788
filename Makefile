# `make demo` and `make test` create .venv on first use and reuse it after.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test examples bench lint clean

$(STAMP): pyproject.toml .ci/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c .ci/constraints.txt -e '.[all,dev]'
	# tf-keras (Keras 2 models in check_models) declares the full tensorflow beside our tensorflow-cpu: --no-deps
	$(PY) -m pip install -q --no-deps -c .ci/constraints.txt tf-keras
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/equivcheck demo --report reports
	$(PY) -m equivcheck.report.example reports/example --backends numpy,torch

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist worksteal

# Real third-party converters checked with equivcheck (examples/README.md); --no-deps keeps the pinned frameworks.
EXAMPLES_STAMP := $(VENV)/.examples-installed
$(EXAMPLES_STAMP): $(STAMP) .ci/examples-requirements.txt
	$(PY) -m pip install -q --no-deps -c .ci/constraints.txt -r .ci/examples-requirements.txt
	touch $(EXAMPLES_STAMP)

examples: $(EXAMPLES_STAMP)
	$(PY) -m pytest examples

bench: $(STAMP)
	$(PY) benchmarks/run.py

lint: $(STAMP)
	$(VENV)/bin/ruff check equivcheck tests benchmarks examples

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
