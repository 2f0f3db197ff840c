# The two commands of the README: `make demo` and `make test`. Both bootstrap a fresh machine.
# demo/ and bench/ scripts run as modules from the repository root (`python -m demo.run`), so
# they import the shared test harness as `tests.harness` (docs/decisions/0016).
VENV ?= .venv
PYTEST_ARGS ?=

.PHONY: demo test lint unit integration bench bootstrap

bootstrap:
	@scripts/bootstrap.sh

demo: bootstrap
	$(VENV)/bin/python -m demo.run $(DEMO_ARGS)

lint: bootstrap
	$(VENV)/bin/ruff check src tests bench demo plugins

test: lint
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

unit: bootstrap
	$(VENV)/bin/pytest -q tests/unit

integration: bootstrap
	$(VENV)/bin/pytest -q tests/integration

bench: bootstrap
	$(VENV)/bin/python -m bench.notify_latency
