"""Suite-wide ordering for the parallel run (docs/decisions/0027-parallel-test-run.md).

``make test`` runs two pytest-xdist workers, a file at a time each. The wall time is the
busier worker's, so the longest files go first and the many short unit files last, where they
fill whatever gap is left: a test marked ``long`` (minutes of waiting, e.g. the 10-minute
firewall cut) starts at once instead of after everything else.
"""

from __future__ import annotations

import pytest


def _rank(item: pytest.Item) -> int:
    if item.get_closest_marker("long") is not None:
        return 0
    if "/tests/unit/" in f"/{item.nodeid}":
        return 2
    return 1


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    items.sort(key=_rank)  # stable: the collection order stays within each rank
