# Two commands for a newcomer: `make demo` and `make test`. Everything else builds on them.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: install demo test lint typecheck pytest sysdeps clean

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
	$(VENV)/bin/mypy edge tests

pytest: install sysdeps
	$(VENV)/bin/pytest -q

test: lint typecheck pytest

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache build *.egg-info
