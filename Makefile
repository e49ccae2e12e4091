# Two commands from a fresh clone: `make demo` and `make test` (each installs what it needs first, from the lock).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
LATEST := .venv-latest
UV     := uv==0.13.9
# The lock: every package, every transitive dependency, pinned for the Python versions setup.py allows.
LOCK   := constraints.txt
# What Dataflow workers install beside the SDK container (which brings the launcher's Beam): the package's
# own dependencies at the lock's versions.
WORKER_LOCK := configs/worker-requirements.txt

# The training loaders (torch on the CPU, torchcodec, Lhotse, NeMo's ASR collection, datasets): a venv of their
# own, never the product's dependencies (tests/loaders/requirements.txt says which versions and why).
LOADERS := .venv-loaders

.PHONY: demo test test-latest test-loaders lint lock proto bench clean

$(VENV)/.run: setup.py $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c $(LOCK) -e .
	touch $@

$(VENV)/.test: setup.py $(LOCK) $(VENV)/.run
	$(BIN)/pip install --quiet -c $(LOCK) -e ".[test]"
	touch $@

demo: $(VENV)/.run  ## install, then run the pipeline on the bundled local server
	$(BIN)/python -m pipeline demo --output demo-output

test: $(VENV)/.test lint  ## install, lint, then run every test
	$(BIN)/python -m pytest

# The newest releases setup.py allows, no lock: what `pip install` gives a user today. A fast end-to-end
# subset (the demo, a run on each local runner mode), so a new upstream release is seen the day it appears.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install --quiet --upgrade pip
	$(LATEST)/bin/pip install --quiet -e ".[test]"
	$(LATEST)/bin/pip list 2>/dev/null | grep -iE '^(apache-beam|grpcio|protobuf|pyarrow) '
	$(LATEST)/bin/python -m pytest -m latest

$(LOADERS)/.installed: tests/loaders/requirements.txt tests/loaders/install.sh $(LOCK)
	bash tests/loaders/install.sh $(LOADERS)
	touch $@

# Datasets built by the product's venv (as a user builds them), loaded in the loaders' venv (as a trainer does).
test-loaders: $(VENV)/.run $(LOADERS)/.installed  ## one epoch of each trainer's loader on built datasets
	PRODUCT_PYTHON=$(abspath $(BIN))/python $(LOADERS)/bin/python -m pytest -o addopts="-q -ra" \
		--confcutdir=tests/loaders -p no:cacheprovider tests/loaders

lint: $(VENV)/.test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Remake the lock from setup.py's ranges with today's releases; then `make test` and commit both files.
lock:
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet $(UV)
	.venv-lock/bin/uv pip compile setup.py --extra gcp --extra aws --extra test --universal \
		--python-version 3.11 --upgrade --quiet --custom-compile-command "make lock" -o $(LOCK)
	.venv-lock/bin/uv pip compile setup.py --universal --python-version 3.11 -c $(LOCK) --no-deps \
		--no-annotate --quiet --custom-compile-command "make lock" --no-emit-package apache-beam -o $(WORKER_LOCK)
	rm -rf .venv-lock

proto: $(VENV)/.test  ## regenerate pipeline/service/wire/ from schemas/speech_service.proto
	$(BIN)/python -m grpc_tools.protoc --proto_path=pipeline/service/wire=schemas \
		--python_out=. --pyi_out=. --grpc_python_out=. schemas/speech_service.proto

bench: $(VENV)/.test  ## the performance benchmarks (print tables, write JSON): throughput, object storage, reruns, layouts, exports
	$(BIN)/python -m benchmarks.run
	$(BIN)/python -m benchmarks.storage
	$(BIN)/python -m benchmarks.rerun
	$(BIN)/python -m benchmarks.layouts
	$(BIN)/python -m benchmarks.exports

clean:
	rm -rf $(VENV) $(LATEST) $(LOADERS) demo-output .pytest_cache
