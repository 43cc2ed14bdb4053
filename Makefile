# fedstack: the README's two commands are `make run` and `make test`.
# Everything is installed into ./.venv from the package registries on first use.

VENV ?= .venv
PYTHON ?= python3
BIN := $(CURDIR)/$(VENV)/bin

# Flower's SuperLink would otherwise `uv sync` the app's dependencies at run time and pull a
# CUDA torch (GBs); everything is already in the venv.
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
# A private Flower home, so the local SuperLink `flwr run` starts is ours to stop.
export FLWR_HOME ?= $(CURDIR)/.flwr-home
# Run outputs land under ./outputs even though the SuperLink runs the ServerApp elsewhere.
export FEDSTACK_OUTPUT_BASE ?= $(CURDIR)
export PATH := $(BIN):$(PATH)

# Options of the default `make run` (override: make run RUN_CONFIG="task='breast_cancer'").
RUN_CONFIG ?= task='digits' aggregation='fedavg' dp='none'
FEDERATION_CONFIG ?= num-supernodes=5 client-resources-num-cpus=1
# Where `make run` looks for the run's summary.json (the run's output_dir).
RUN_OUTPUTS ?= $(FEDSTACK_OUTPUT_BASE)/outputs

.PHONY: run test lint install stop-superlink clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed-test

# `flwr run --stream` exits 0 even when the ServerApp failed: the run's own outcome
# (summary.json's status, written after the marker) decides make's exit code.
run: $(VENV)/.installed
	@mkdir -p $(FLWR_HOME); marker=$$(mktemp $(FLWR_HOME)/run-started.XXXXXX); status=0; \
	flwr run . --stream --run-config "$(RUN_CONFIG)" \
		--federation-config "$(FEDERATION_CONFIG)" || status=$$?; \
	$(MAKE) --no-print-directory stop-superlink; \
	if [ $$status -eq 0 ]; then \
		fedstack outcome $(RUN_OUTPUTS) --newer-than $$marker || status=$$?; \
	fi; \
	rm -f $$marker; exit $$status

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .

test: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The local SuperLink started by `flwr run` is detached and outlives the command.
stop-superlink:
	@# "[f]lower" matches the SuperLink's command line but not this shell's own.
	@pkill -f "[f]lower-superlink.*$(FLWR_HOME)/local-superlink" && echo "stopped the local SuperLink" || true

clean: stop-superlink
	rm -rf $(VENV) $(FLWR_HOME)
