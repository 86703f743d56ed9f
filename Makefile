# af_train developer commands. `make test` installs what it needs (idempotent), lints, runs pytest.
PYTHON ?= python3
PIP_INSTALL = $(PYTHON) -m pip install -q -c constraints.txt
STAMP = .make/installed

.PHONY: install test lint pytest clean demo

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

clean:
	rm -rf .make .pytest_cache .ruff_cache build *.egg-info
