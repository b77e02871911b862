# Two commands on a fresh machine:  `make run` (train + serve on a local Ray cluster)  and  `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STORAGE ?= $(CURDIR)/storage
# Extra train.py flags, e.g. TRAIN_ARGS="--epochs 3"; the defaults are in training/defaults.py.
TRAIN_ARGS ?=
# The local cluster runs with token authentication: its clients get in with these exports.
AS_CLIENT = eval "$$($(PY) -m ray_cluster env)" &&

.PHONY: run test setup browser up down train serve clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade --quiet pip
	$(VENV)/bin/pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

up: setup
	$(PY) -m ray_cluster up

down:
	$(PY) -m ray_cluster down

train: up
	$(PY) -m training.data --storage $(STORAGE)
	$(AS_CLIENT) $(VENV)/bin/ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
		python training/train.py --storage $(STORAGE) $(TRAIN_ARGS)

serve: up
	$(AS_CLIENT) $(PY) -m serving deploy --storage $(STORAGE)

# Set up, start the local Ray cluster, get MNIST, train with `ray job submit`, then serve the model.
run: train serve

# The page test drives a real Chromium: found, or installed (Debian's as root, else Playwright's);
# without one it skips and names the command to run (CI=1: fails).
browser: setup
	$(PY) -m tests.browser install

test: setup browser
	$(PY) -m pytest

clean: down
	rm -rf $(VENV) $(STORAGE)
