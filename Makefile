# Two commands for a fresh machine (see README):
#   make demo   set up .venv, draw the built-in data set, train on it, evaluate on its test split
#   make test   set up .venv (or reuse it) and run the test suite
PYTHON_SYSTEM ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Offline-safe defaults: nothing in the demo or the tests needs the Hub, and albumentations must not ask PyPI.
export HF_HUB_OFFLINE ?= 1
export NO_ALBUMENTATIONS_UPDATE := 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv demo test data results bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON_SYSTEM) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

data: data/shapes/results.csv

data/shapes/results.csv: | venv
	$(PY) download.py --dataset shapes --out data/shapes

demo: venv data
	$(PY) train.py --preset shapes --data-dir data/shapes --run-dir runs/shapes --overwrite
	$(PY) evaluate.py --checkpoint runs/shapes/best --data-dir data/shapes --split test --json runs/shapes/test.json

# the README's retrieval pictures, from the demo run's best checkpoint
results: venv
	$(PY) search.py --checkpoint runs/shapes/best --data-dir data/shapes --make-results results

test: venv
	$(PY) -m pytest -q

clean:
	rm -rf runs/shapes data/shapes
