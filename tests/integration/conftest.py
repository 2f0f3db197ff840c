"""Fixtures shared by the integration tests (the harness itself is tests/harness/)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness.topology import Topology, build_topology


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    """Two devices with sshd running; namespaced when root."""
    with build_topology(tmp_path_factory.mktemp("topology"), n_devices=2) as topo:
        yield topo


@pytest.fixture(scope="module")
def topology1(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    """One device, sshd running."""
    with build_topology(tmp_path_factory.mktemp("topology1"), n_devices=1) as topo:
        yield topo
