# Two commands: `make demo` (set up .venv if needed, train the tiny preset on a synthetic dataset,
# sample held-out identities, write a report; `make demo MINUTES=30` trains longer) and `make test`
# (set up .venv, run the tests). `make leakage` runs the miniature leakage benchmark; `make base`
# pre-trains the tiny SD + CLIP stack that tiny runs start from. `make test-fast` leaves out the slow tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

DEMO_OUT ?= demo-output
MINUTES  ?= 10
LEAKAGE_OUT ?= leakage-output
BASE_OUT ?= base-output
STEPS    ?= 500

.PHONY: demo leakage base test test-fast bench clean-venv

# The venv in two layers, each reinstalled when its requirements file changes: .runtime has what the
# commands import (requirements.txt), .dev adds the tests' and bench's oracles (requirements-dev.txt).
$(VENV)/.runtime: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	touch $@

demo: $(VENV)/.runtime
	$(PY) -m experiments.demo --out $(DEMO_OUT) --minutes $(MINUTES)

# The leakage benchmark in miniature: RetriNet, ControlNet and IP-Adapter fine-tuned in settings a and b,
# three seeds each, sampled and scored as the paper (BENCHMARKS.md has its time on a 2-core CPU;
# `make leakage STEPS=N` trades time for strength; reruns reuse finished runs).
leakage: $(VENV)/.runtime
	$(PY) -m experiments.leakage --out $(LEAKAGE_OUT) --steps $(STEPS)

# The tiny SD + CLIP stack from scratch, as shipped in tiny-stack/ (56 minutes measured on a 2-core CPU):
# CLIP contrastively, then the U-Net text-to-image. Use it with `train.py --preset tiny --stack $(BASE_OUT)`.
base: $(VENV)/.runtime
	$(PY) pretrain.py --out $(BASE_OUT)

test: $(VENV)/.dev
	$(PY) -m pytest

test-fast: $(VENV)/.dev
	$(PY) -m pytest -m "not slow"

bench: $(VENV)/.dev
	$(PY) bench/clip_text.py

clean-venv:
	rm -rf $(VENV)
