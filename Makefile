# The two commands of the README: `make demo` and `make test`. Both bootstrap a fresh machine.
# demo/ and bench/ scripts run as modules from the repository root (`python -m demo.run`), so
# they import the shared test harness as `tests.harness` (docs/decisions/0016).
VENV ?= .venv
PYTEST_ARGS ?=
# two pytest-xdist workers, a test file per worker at a time (module fixtures stay whole);
# `make test PYTEST_XDIST=` runs serially (docs/decisions/0027-parallel-test-run.md)
PYTEST_XDIST ?= -n 2 --dist loadfile --no-loadscope-reorder
# a short per-checkout base: ssh's ControlPath must fit a unix socket path (108 bytes), and
# xdist adds a popen-gwN level to every tmp_path
PYTEST_BASETEMP ?= /tmp/np-pt-$(shell printf %s "$(CURDIR)" | cksum | cut -c1-8)

.PHONY: demo test lint unit integration bench bootstrap

bootstrap:
	@scripts/bootstrap.sh

demo: bootstrap
	$(VENV)/bin/python -m demo.run $(DEMO_ARGS)

lint: bootstrap
	$(VENV)/bin/ruff check src tests bench demo plugins

test: lint
	$(VENV)/bin/pytest -q $(PYTEST_XDIST) --basetemp=$(PYTEST_BASETEMP) $(PYTEST_ARGS)

unit: bootstrap
	$(VENV)/bin/pytest -q tests/unit

integration: bootstrap
	$(VENV)/bin/pytest -q tests/integration

bench: bootstrap
	$(VENV)/bin/python -m bench.notify_latency
