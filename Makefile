# bdn — the two commands a newcomer needs are `make demo` and `make test`.
# Both build the virtual environment first, from nothing.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv demo test lint bench bench-mirror bench-cache bench-pull bench-load bench-coldstart clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: venv
	$(PY) -m bdn.demo

test: venv
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: venv
	$(PY) -m pip install --quiet -e '.[test,bench]'
	for b in bench/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .demo .bench
