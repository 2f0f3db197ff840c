# The two commands of the README: `make demo` and `make test`. Both bootstrap a fresh machine.
VENV ?= .venv
PYTEST_ARGS ?=

.PHONY: demo test lint unit integration bench bootstrap

bootstrap:
	@scripts/bootstrap.sh

demo: bootstrap
	$(VENV)/bin/python -m noports.demo $(DEMO_ARGS)

lint: bootstrap
	$(VENV)/bin/ruff check src tests bench

test: lint
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

unit: bootstrap
	$(VENV)/bin/pytest -q tests/unit

integration: bootstrap
	$(VENV)/bin/pytest -q tests/integration

bench: bootstrap
	$(VENV)/bin/python bench/notify_latency.py
