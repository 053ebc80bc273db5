# Quickstart: `make demo` and `make test` work on a fresh machine (they create .venv themselves).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUST_CRATE := sdk/rust
LEAKY := $(RUST_CRATE)/target/release/examples/leaky

.PHONY: venv demo test bench faults lint clean rust conformance

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

# The Rust SDK's example, built offline from Debian's packaged crates (see sdk/rust/.cargo/config.toml).
rust:
	cd $(RUST_CRATE) && cargo build --release --offline --example leaky

# The conformance kit against the Python SDK's example and the Rust example; report in .conformance/results.json.
conformance: $(STAMP) rust
	rm -f .conformance/results.json
	status=0; \
	$(PY) -m protocol.conformance --name python-sdk --results .conformance/results.json -- \
		$(PY) examples/sdk_loop.py 3000 || status=1; \
	$(PY) -m protocol.conformance --name rust-leaky --results .conformance/results.json -- \
		$(LEAKY) --steps 1000 --leak-mb 1 --step-ms 3 || status=1; \
	echo "results: .conformance/results.json"; exit $$status

faults: $(STAMP)
	$(PY) -m tests.faults $(if $(QUICK),--quick,)
	$(if $(QUICK),,MLXSUP_MODEL_EXAMPLES=3000 $(PY) -m pytest -q tests/test_lifecycle_model.py)

lint: $(STAMP)
	$(PY) -m pip install --quiet ruff mypy
	$(VENV)/bin/ruff check supervisor worker protocol tests bench
	$(VENV)/bin/mypy supervisor worker protocol

clean:
	rm -rf $(VENV) .demo .bench .faults .conformance $(RUST_CRATE)/target
