# cfm-jax: `make quickstart` trains and evaluates on the bundled photos, `make test` runs the suite.
# Both create the virtual environment .venv from requirements*.txt when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUNDIR ?= runs/quickstart

.PHONY: quickstart test bench venv clean-runs

$(VENV)/.runtime-installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.test-installed: requirements-test.txt $(VENV)/.runtime-installed
	$(PY) -m pip install --quiet -r requirements-test.txt
	touch $@

venv: $(VENV)/.runtime-installed

quickstart: $(VENV)/.runtime-installed
	$(PY) train.py --config configs/quickstart.py --workdir $(RUNDIR)
	$(PY) eval.py --workdir $(RUNDIR)

test: $(VENV)/.test-installed
	$(PY) -m pytest tests -q -ra

bench: $(VENV)/.runtime-installed
	$(PY) bench/bench_train.py --config configs/quickstart.py
	$(PY) bench/bench_train.py --config configs/flow400_64-128/unet_base_psu.py --latent_size 32 --batch_size 1
	$(PY) bench/bench_data.py
	$(PY) bench/bench_scaling.py

clean-runs:
	rm -rf $(RUNDIR)
