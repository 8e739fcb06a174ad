# duo_fast: `make demo` and `make test` each set up their own virtual environment first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.duo_fast-installed

.PHONY: install demo test lint compat tails bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first: with no torch present, pin 2.13.0 (the CPU build on disk on our CPU machines,
# the registry's default build elsewhere); a torch that is already installed is kept.
$(STAMP): setup.py $(wildcard csrc/*) $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q --no-build-isolation -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Train a tiny model on the bundled corpus (curriculum, then discrete), then sample at 8 and 64 steps.
# The final step is ancestral: a few CPU minutes of training leave the model near the unigram
# distribution, where the greedy tail (the default of `duo-fast sample`) collapses onto one token.
DEMO_SAMPLE = $(BIN)/duo-fast sample --checkpoint runs/demo/export --batch 8 --seed 0 --noise-removal ancestral
demo: install
	$(BIN)/duo-fast train --preset demo --out runs/demo --overwrite   # a previous demo run is moved aside, not deleted
	$(DEMO_SAMPLE) --steps 8 --out runs/demo/samples-8.jsonl
	$(DEMO_SAMPLE) --steps 64 --out runs/demo/samples-64.jsonl

test: install lint
	$(BIN)/pytest -q tests

# pyflakes, pycodestyle, import order, bugbear, pyupgrade (ruff.toml)
lint: install
	$(BIN)/ruff check .

# the Triton versions setup.py admits, in throwaway venvs under .compat/ (slow: not in make test)
compat: install
	bench/compat.sh

# the posterior draw's tail end to end: K = 50257, 20.5 nats, 300k draws (slow: not in make test)
tails: install
	$(BIN)/python bench/tails.py

clean:
	rm -rf runs $(VENV) build *.egg-info
