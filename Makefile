# `make demo` and `make test` each create the virtual environment they need (.venv) on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= demo_run

.PHONY: demo test test-all lint venv clean-demo

# `pip check`: s3fs and gcsfs each constrain fsspec (s3fs also botocore); a clash fails here, not in a test.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip check
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/ctplatform demo --workdir $(DEMO_DIR)

lint: $(STAMP)
	$(BIN)/ruff check platform tests benchmarks

test: $(STAMP) lint
	$(BIN)/pytest

clean-demo:
	rm -rf $(DEMO_DIR)
