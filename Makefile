# af_train developer commands. `make test` installs what it needs (idempotent), lints, runs pytest.
PYTHON ?= python3
PIP_INSTALL = $(PYTHON) -m pip install -q -c constraints.txt
STAMP = .make/installed

.PHONY: install test lint pytest clean demo gpu-check

$(STAMP): setup.py constraints.txt
	$(PIP_INSTALL) -e '.[dev]'
	@mkdir -p .make && touch $(STAMP)

install: $(STAMP)

lint: install
	$(PYTHON) -m ruff check .

pytest: install
	$(PYTHON) -m pytest

test: lint pytest

# The whole pipeline on synthetic data (~6 min on 2 CPU cores); reruns reuse finished stages.
# Options: make demo DEMO_ARGS='--plan' (see python3 tools/demo.py --help).
demo: install
	$(PYTHON) tools/demo.py $(DEMO_ARGS)

# The whole GPU verification in one command (<= 8 min on one H100/H200): pytest -m cuda, a kernel
# sweep and af-benchmark-train; results in benchmarks/results/<gpu>/. See README "Checking a GPU machine".
# Needs no install (it runs from the checkout; .whl/ wheels are installed first when present).
gpu-check:
	bash tools/gpu_check.sh $(GPU_CHECK_ARGS)

clean:
	rm -rf .make .pytest_cache .ruff_cache build *.egg-info
