# Two commands (see README): `make quickstart` and `make test`. Both create .venv when needed.
# `make mlflow-ui` browses the sweeps' MLflow store on http://127.0.0.1:5000.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: setup setup-test quickstart test bench mlflow-ui clean

setup-test: $(TEST_STAMP)

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

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m bench

mlflow-ui: $(STAMP)
	$(BIN)/mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///$(CURDIR)/results/sweeps/mlflow.db

clean:
	rm -rf results .pytest_cache
