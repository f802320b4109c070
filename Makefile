# Two commands (see README): `make quickstart` and `make test`. Both create .venv when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup quickstart test bench clean

setup: $(STAMP)

# Reinstall only when the dependency list changes; the package itself is installed editable.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $(STAMP)

# A small real CTS run on the embedded default (digits): no network, no GPU.
quickstart: $(STAMP)
	$(BIN)/cts-ray run configs/digits.yaml --out results/runs/quickstart --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf results .pytest_cache
