# Two commands: `make demo` (set up .venv if needed, train the tiny preset on a synthetic dataset,
# sample held-out identities, write a report; `make demo MINUTES=30` trains longer) and `make test`
# (set up .venv, run the tests). `make leakage` runs the miniature leakage benchmark; `make base`
# pre-trains the tiny SD + CLIP stack that tiny runs start from.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

DEMO_OUT ?= demo-output
MINUTES  ?= 10
LEAKAGE_OUT ?= leakage-output
BASE_OUT ?= base-output
STEPS    ?= 1200

.PHONY: demo leakage base test bench clean-venv

# The venv is rebuilt whenever a requirements file changes.
$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	touch $@

demo: $(VENV)/.installed
	$(PY) demo.py --out $(DEMO_OUT) --minutes $(MINUTES)

# The leakage benchmark in miniature: RetriNet, ControlNet and IP-Adapter trained in settings a and b
# (78 minutes on a 2-core CPU; `make leakage STEPS=N` trades time for strength; reruns reuse runs).
leakage: $(VENV)/.installed
	$(PY) -m eval.leakage --out $(LEAKAGE_OUT) --steps $(STEPS)

# The tiny SD + CLIP stack from scratch, as shipped in tiny-stack/ (about 75 minutes on a 2-core CPU):
# CLIP contrastively, then the U-Net text-to-image. Use it with `train.py --preset tiny --stack $(BASE_OUT)`.
base: $(VENV)/.installed
	$(PY) pretrain.py --out $(BASE_OUT)

test: $(VENV)/.installed
	$(PY) -m pytest

bench: $(VENV)/.installed
	$(PY) bench/clip_text.py

clean-venv:
	rm -rf $(VENV)
