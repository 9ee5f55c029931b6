# Two entry points on a fresh machine: `make demo` and `make test`. Both create .venv first. `make demo` passes
# --force: running it again moves the previous runs/default aside to runs/default.old-<time> (never deletes it).
# torch is pinned to 2.13.0 and installed before the project: on the reference machine that is a CPU wheel already
# on disk, while an unpinned torch could pull a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint clean

setup: $(VENV)/.fedshop-installed

$(VENV)/.fedshop-installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -c "import torch; v = torch.__version__; assert v.startswith('2.13.0'), f'torch was replaced: {v}'; print('fedshop environment ready: torch', v)"
	touch $@

demo: setup
	$(VENV)/bin/fedshop simulate --config configs/default.toml --force

test: setup
	$(VENV)/bin/ruff check server client shared tests bench
	$(PY) -m pytest -n 2 --dist loadgroup

lint: setup
	$(VENV)/bin/ruff check server client shared tests

clean:
	rm -rf runs bases .pytest_cache
