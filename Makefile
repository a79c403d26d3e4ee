# make install  : a virtual environment with the pinned dependencies and Sluice built into it
# make run      : install, then serve the default model on port 3000
# make test     : install, then every test (Rust, Python unit, end-to-end)
# make bench    : the benchmark (see benchmark/README.md); BENCH_ARGS=--quick for a smoke test
# make perplexity: perplexity against transformers and load-time memory, then docs/performance.md
# make openapi  : regenerate docs/openapi.json from the router's code
VENV ?= .venv
PYTHON := $(VENV)/bin/python
PIP := $(PYTHON) -m pip
DEPS_STAMP := $(VENV)/.deps-$(shell cat requirements/*.txt | sha256sum | cut -c1-16)

.PHONY: install run test test-rust test-python test-integration fmt lint proto bench perplexity openapi

$(DEPS_STAMP): requirements/runtime.txt requirements/dev.txt requirements/no-deps.txt
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements/runtime.txt -r requirements/dev.txt
	$(PIP) install -q --no-deps -r requirements/no-deps.txt
	rm -f $(VENV)/.deps-* && touch $@

install: $(DEPS_STAMP)
	$(PIP) install -q --no-deps --no-build-isolation .
	@# Ahead of the first serve; without a C++ compiler Sluice serves with PyTorch's operators.
	$(VENV)/bin/sluice-server build-kernels || \
		echo "warning: the CPU kernels did not build (see above); Sluice will serve with PyTorch's slower operators"

run: install
	$(VENV)/bin/sluice-launcher

test: install test-rust test-python test-integration

test-rust:
	cargo test --release --workspace

test-python:
	PYTHONPATH=server $(PYTHON) -m pytest -q server/tests

test-integration:
	PATH=$(abspath $(VENV))/bin:$$PATH $(PYTHON) -m pytest -q integration-tests

proto: $(DEPS_STAMP)
	$(PYTHON) server/generate_proto.py

fmt:
	cargo fmt --all

# Through a temporary file, so a failed build leaves the committed document as it was.
openapi:
	cargo run -q --release --bin sluice-router -- print-schema > docs/openapi.json.tmp
	mv docs/openapi.json.tmp docs/openapi.json

lint:
	cargo fmt --all -- --check
	cargo clippy --release --workspace -- -D warnings

bench: install
	$(PYTHON) benchmark/run_all.py $(BENCH_ARGS)

# The page is re-rendered even when the perplexity check fails, so it shows the failure.
perplexity: install
	$(PYTHON) benchmark/load_memory.py
	$(PYTHON) benchmark/perplexity.py; status=$$?; \
		$(PYTHON) benchmark/report.py benchmark/results/latest.json && exit $$status
