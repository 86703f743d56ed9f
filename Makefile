# af_train developer commands. `make test` installs what it needs (idempotent), lints, runs pytest.
PYTHON ?= python3
PIP_INSTALL = $(PYTHON) -m pip install -q -c constraints.txt
STAMP = .make/installed

.PHONY: install test lint pytest clean demo gpu-check gpu-wheels

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

# The wheels the GPU image lacks, into .whl/ (run here, with the package index): the shared script's, plus
# soundfile and its cffi/pycparser, which af-prepare's decoding (gpu-check's prepare step) needs.
gpu-wheels:
	bash ../shared/tools/gpu-wheels.sh
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .whl soundfile==0.14.0 cffi==2.0.0 pycparser==3.0

clean:
	rm -rf .make .pytest_cache .ruff_cache build *.egg-info
