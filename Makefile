# One command each, from a fresh machine: `make demo` trains the demo model, `make test` runs the tests.
# Both create the virtual environment first. torch is installed before the package so that pip takes
# the local CPU build on machines that have one instead of downloading a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo demo-llama test clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev,bench,wandb]"
	touch $(STAMP)

demo: setup
	bash launchers/demo.sh

demo-llama: setup
	DEMO_CONFIG=ds_configs/demo-llama.yaml DEMO_RUN_DIR=runs/demo-llama DEMO_TOKENIZER_KIND=byte-fallback \
		bash launchers/demo.sh

test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=40 tests

clean:
	rm -rf $(VENV) runs
