# Two entry points on a fresh machine: `make demo` and `make test`. Both create .venv first.
.PHONY: setup demo test lint clean

setup:
	./scripts/setup.sh

demo: setup
	.venv/bin/fedshop pretrain --config configs/default.toml
	.venv/bin/fedshop simulate --config configs/default.toml

test: setup
	.venv/bin/python -m pytest

lint: setup
	.venv/bin/ruff check server client shared tests

clean:
	rm -rf runs bases .pytest_cache
