# The two commands of the README: `make demo` runs the whole system on real data,
# `make test` runs every check CI runs. Both set up .venv on first use.

VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= $(shell command -v python3.11 || command -v python3)
STAMP := $(VENV)/.installed

.PHONY: demo demo-quick test lint setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, with pip: the pinned CUDA build installs from this machine's disk
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[dev,demo]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedinspect demo --edges 3 --references pooled --json out/demo.json --report out/report

demo-quick: $(STAMP)
	$(VENV)/bin/fedinspect demo --edges 3 --quick --json out/demo-quick.json

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy fl_core server_service edge_service fedinspect bench

test: lint
	$(VENV)/bin/pytest -W error

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache
