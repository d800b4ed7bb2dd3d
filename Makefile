# The two commands of the README: `make demo` runs the whole system on real data,
# `make test` runs every check CI runs (`make check`: the same but the slow tests). All
# set up .venv on first use.

VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= $(shell command -v python3.11 || command -v python3)
STAMP := $(VENV)/.installed

.PHONY: demo demo-full demo-quick test check lint setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, with pip: the pinned CUDA build installs from this machine's disk
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[dev,demo]'
	# Flower's FedAvg, the bench's reference (tests run its loop): flwr pins older
	# fastapi/typer/protobuf than ours, so it goes in without its own pins, beside the
	# few packages it imports that this project does not already bring
	$(PY) -m pip install --quiet grpcio==1.85.3 grpcio-health-checking==1.81.1 \
		cryptography==50.0.2 pycryptodome==3.24.1 iterators==0.0.2 tomli==2.5.0 tomli_w==1.2.0
	$(PY) -m pip install --quiet --no-deps flwr==1.42.0
	touch $(STAMP)

# all of elpv at 224 px, references stage 2 only: minutes
demo: $(STAMP)
	$(VENV)/bin/fedinspect demo --edges 3 --input-size 224 --references pooled \
		--json out/demo.json --report out/report

# elpv's own 300 px, references trained as the federated models: the benchmark's run
demo-full: $(STAMP)
	$(VENV)/bin/fedinspect demo --edges 3 --references full \
		--json out/demo-full.json --report out/report-full

demo-quick: $(STAMP)
	$(VENV)/bin/fedinspect demo --edges 3 --quick --json out/demo-quick.json

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy fl_core server_service edge_service fedinspect bench experiments

test: lint
	$(VENV)/bin/pytest -W error

# the inner loop: lint and every test but the slow ones (real processes, real models);
# CI runs them all (make test)
check: lint
	$(VENV)/bin/pytest -W error -m "not slow"

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache
