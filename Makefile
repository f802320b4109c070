# Two commands (see README): `make quickstart` and `make test`. Both create .venv when needed.
# `make mlflow-ui` browses the sweeps' MLflow store on http://127.0.0.1:5000.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: setup setup-test browser quickstart test bench mlflow-ui clean

setup-test: $(TEST_STAMP) browser

setup: $(STAMP)

# Reinstall only when the dependency list changes; the package itself is installed editable.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $(STAMP)

# The quickstart sweep on the embedded default (digits): no network, no GPU, then its report. Run
# again, it resumes (a finished sweep just prints its summary again).
QS := results/sweeps/quickstart
quickstart: $(STAMP)
	$(BIN)/cts-ray sweep tune_configs/quickstart.yaml $(if $(wildcard $(QS)/tune),--resume,)
	$(BIN)/cts-ray report $(QS)

# The test extras (pyproject's [test]) and the system packages the tests drive.
$(TEST_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(TEST_STAMP)

# Debian's Chromium and its driver, which tests/test_mlflow_ui.py drives headless; installed only
# when missing (a clean CI machine), never downloaded by Selenium.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
# g++: torch.compile's CPU backend (the compiled CTS search step) builds its kernels with it.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null && command -v g++ >/dev/null || \
	  { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver g++ >/dev/null; }

test: $(TEST_STAMP) browser
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m bench

mlflow-ui: $(STAMP)
	$(BIN)/mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///$(CURDIR)/results/sweeps/mlflow.db

clean:
	rm -rf results .pytest_cache
