# Two commands: `make demo` (set up .venv if needed, train the tiny preset on a synthetic dataset,
# sample held-out identities, write a report; `make demo MINUTES=30` trains longer) and `make test`
# (set up .venv, run the tests).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

DEMO_OUT ?= demo-output
MINUTES  ?= 10

.PHONY: demo test bench clean-venv

# The venv is rebuilt whenever a requirements file changes.
$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	touch $@

demo: $(VENV)/.installed
	$(PY) demo.py --out $(DEMO_OUT) --minutes $(MINUTES)

test: $(VENV)/.installed
	$(PY) -m pytest

bench: $(VENV)/.installed
	$(PY) bench/clip_text.py

clean-venv:
	rm -rf $(VENV)
