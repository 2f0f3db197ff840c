"""The sshnp library (``open_session`` + ``serve_socket``) used many times in ONE event loop.

Issue 9 point 9 (20 sessions one after another, then 20 at once) and its regression: a session whose ``serve_socket`` was cancelled (or was still
running) left its pump's asyncio transports alive on the relay socket; ``session.close()``
then closed that socket behind them, and the next connection of the loop that got the same fd number failed with
``RuntimeError: File descriptor 13 is used by transport ...``. Everything here is real: the
plane, srvd, sshnpd and OpenSSH (loopback topology: no namespaces needed).
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import Iterator

import pytest

from tests.harness.world import World, noports_world, run_inprocess

pytestmark = pytest.mark.integration
N = 20  # the figure: 20 sessions one after another, then 20 at once


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with noports_world(tmp_path_factory.mktemp("libloop"), n_devices=1,
                       namespaced=False) as w:
        yield w


def test_sessions_one_after_another_and_concurrently_in_one_loop(world: World) -> None:
    async def one(tag: str) -> str:
        _session, rc, out, err = await run_inprocess(world, 1, "aes", f"echo {tag}")
        assert rc == 0, err
        return out

    async def main() -> None:
        for _ in range(N):  # each ends with serve cancelled + session.close()
            tag = uuid.uuid4().hex[:8]
            assert tag in await one(tag)
        tags = [uuid.uuid4().hex[:8] for _ in range(N)]
        outs = await asyncio.gather(*(one(t) for t in tags))
        for t, out in zip(tags, outs, strict=True):
            assert t in out

    asyncio.run(main())


def test_closing_a_session_while_it_serves_stops_the_pump(world: World) -> None:
    from noports.client.flow import open_session

    async def main() -> None:
        for _ in range(3):
            session = await asyncio.wait_for(open_session(world.session_params(1, "aes")), 40)
            local, peer = socket.socketpair()
            serving = asyncio.ensure_future(session.tunnel.serve_socket(local))
            await asyncio.sleep(0.2)  # the pump is running
            session.close()
            await asyncio.wait_for(serving, 10)  # the pump ended instead of being orphaned
            peer.settimeout(5)
            try:  # the local side sees the end (after what the tunnel delivered, e.g. a banner)
                while peer.recv(65536):
                    pass
            except ConnectionResetError:
                pass  # an abort resets rather than closes
            peer.close()
        tag = uuid.uuid4().hex[:8]
        _session, rc, out, err = await run_inprocess(world, 1, "aes", f"echo {tag}")
        assert rc == 0 and tag in out, err

    asyncio.run(main())
