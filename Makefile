# `make demo` and `make test` set the project up on first use (a .venv with pinned dependencies).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
BENCH  := $(VENV)/.installed-bench

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@# command-line tools the tests and benchmarks drive (Debian packages), when apt-get is at hand
	@command -v kubectl >/dev/null && command -v wrk >/dev/null || \
	  { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	    (apt-get install -y -qq kubectl wrk >/dev/null 2>&1 || \
	     (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq kubectl wrk >/dev/null 2>&1)) || \
	    echo "note: kubectl/wrk not installed (k8s manifest tests skip; benchmarks need wrk)"; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/medray demo

test: $(STAMP)
	$(BIN)/python -m pytest tests

# the bench extra (LitServe, the third serving peer) on top of setup's environment; setup and test never install it
$(BENCH): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	touch $(BENCH)

bench: $(BENCH)
	$(BIN)/python benchmarks/serving.py

clean:
	rm -rf $(VENV) .medray-demo build *.egg-info
