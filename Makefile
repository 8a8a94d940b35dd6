# Two commands on a fresh machine: `make demo` and `make test`. Everything else is installed here.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TOOLS := .tools
STAMP := $(VENV)/.installed
PROTO_SRC := $(wildcard proto/aligner/v1/*.proto)
# Two cores shared by every process: keep each one's BLAS/torch pool small.
export OMP_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install tools proto proto-check lint test test-fast demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch==2.13.0 is pinned in pyproject (the CPU wheel on this disk); constraints.txt pins the rest.
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

tools: $(TOOLS)/.installed

$(TOOLS)/.installed: scripts/install_tools.sh
	bash scripts/install_tools.sh $(TOOLS)
	touch $@

proto: install
	$(PY) -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto --grpc_python_out=proto $(PROTO_SRC)

# Fails when the committed stubs differ from what grpcio-tools generates now.
proto-check: install
	@tmp=$$(mktemp -d) && \
	$(PY) -m grpc_tools.protoc -Iproto --python_out=$$tmp --pyi_out=$$tmp --grpc_python_out=$$tmp $(PROTO_SRC) && \
	for f in $$tmp/aligner/v1/*; do \
		diff -q $$f proto/aligner/v1/$$(basename $$f) >/dev/null || { echo "stale stub: proto/aligner/v1/$$(basename $$f) (run make proto)"; exit 1; }; \
	done && echo "proto stubs up to date"

lint: install tools
	$(VENV)/bin/ruff check .
	$(TOOLS)/node_modules/.bin/buf lint

test: install tools proto-check lint
	$(VENV)/bin/pytest -q -p no:cacheprovider

# Unit tests only (no processes started).
test-fast: install
	$(VENV)/bin/pytest -q -p no:cacheprovider -m "not integration and not slow"

demo: install
	$(VENV)/bin/aligner demo

bench: install
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) $(TOOLS) runs .pytest_cache
