# Two commands from a fresh clone: `make demo` and `make test` (each installs what it needs first).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint proto bench clean

$(VENV)/.run: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.test: setup.py $(VENV)/.run
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

demo: $(VENV)/.run  ## install, then run the pipeline on the bundled local server
	$(BIN)/python -m pipeline demo --output demo-output

test: $(VENV)/.test lint  ## install, lint, then run every test
	$(BIN)/python -m pytest

lint: $(VENV)/.test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

proto: $(VENV)/.test  ## regenerate pipeline/wire/ from schemas/speech_service.proto
	$(BIN)/python -m grpc_tools.protoc --proto_path=pipeline/wire=schemas \
		--python_out=. --pyi_out=. --grpc_python_out=. schemas/speech_service.proto

bench: $(VENV)/.test  ## the performance benchmarks (print tables, write JSON): throughput, then object storage
	$(BIN)/python -m benchmarks.run
	$(BIN)/python -m benchmarks.storage

clean:
	rm -rf $(VENV) demo-output .pytest_cache
