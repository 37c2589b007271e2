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

.PHONY: venv demo test data results clean gpu-wheels

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON_SYSTEM) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

data: venv  # draws the set, or says that data/shapes already holds it
	$(PY) download.py --dataset shapes --out data/shapes

demo: venv data
	$(PY) train.py --preset shapes --data-dir data/shapes --run-dir runs/shapes --overwrite
	$(PY) evaluate.py --checkpoint runs/shapes/best --data-dir data/shapes --split test --json runs/shapes/test.json

# the README's retrieval pictures, from the demo run's best checkpoint
results: venv
	$(PY) search.py --checkpoint runs/shapes/best --data-dir data/shapes --make-results results

test: venv
	$(PY) -m pytest -q

# Wheels that .ci/gpu-check installs on a lent GPU machine (Python 3.12, its own torch, no internet): what that
# machine's python lacks, without dependencies it already has.
GPU_WHEELS := albumentations albucore pydantic pydantic-core annotated-types typing-inspection simsimd stringzilla \
	open-clip-torch ftfy wcwidth pytest pluggy iniconfig packaging pygments
gpu-wheels: venv  # the versions this .venv has, as cp312 wheels
	mkdir -p .whl
	$(PY) -c "import sys, importlib.metadata as m; print(*(f'{p}=={m.version(p)}' for p in sys.argv[1:]), sep='\n')" \
		$(GPU_WHEELS) > .whl/pins.txt
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
		--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
		--platform any -d .whl -r .whl/pins.txt

clean:
	rm -rf runs/shapes data/shapes
