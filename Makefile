# Two commands: `make install` then `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
UNAME_S := $(shell uname -s)
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 1)

.PHONY: install test lint bench clean

install:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
ifeq ($(UNAME_S),Linux)
ifneq ($(HAS_CUDA),1)
	# CPU-only Linux: pin the CPU wheel; other versions pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
endif
endif
	$(BIN)/pip install -q -e ".[torch,mlx,serve,dev,gguf]"

test:
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint:
	$(BIN)/ruff check .

bench:
	$(BIN)/python benchmarks/bench_decode.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
