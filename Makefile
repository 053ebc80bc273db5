# Quickstart: `make demo` and `make test` work on a fresh machine (they create .venv themselves).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test bench faults lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m pip install --quiet -e ".[plot]"
	rm -rf .demo
	$(VENV)/bin/mlxsupd run -c deploy/demo.toml demo --summary .demo/summary.json
	$(PY) -m supervisor.tools.plot .demo/state/jobs/demo --summary .demo/summary.json -o .demo/memory.png
	@echo "summary: .demo/summary.json  plot: .demo/memory.png"

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m bench

faults: $(STAMP)
	$(PY) -m tests.faults $(if $(QUICK),--quick,)

lint: $(STAMP)
	$(PY) -m pip install --quiet ruff mypy
	$(VENV)/bin/ruff check supervisor worker protocol tests bench
	$(VENV)/bin/mypy supervisor worker protocol

clean:
	rm -rf $(VENV) .demo .bench .faults
