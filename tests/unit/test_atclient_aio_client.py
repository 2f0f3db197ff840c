"""The asyncio client's connection logic against a scripted fake atServer on loopback TLS.

Why a fake here (the integration tests use the real servers): it can misbehave on cue — stop
answering heartbeats, drop a connection after a given line, replay duplicates, answer in the
Dart server's framing — which is what the reconnect/de-duplication logic must survive.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable

import pytest

from noports.atclient import aio
from noports.atclient.aio import AtClient, AtProtocolError
from noports.keys.atkeys import generate_atkeys
from noports.keys.ca import client_context, ensure_plane_tls, server_context

ME = "@bob"


@pytest.fixture(scope="module")
def keys():
    return generate_atkeys(ME)


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return ensure_plane_tls(tmp_path_factory.mktemp("tls"), ["127.0.0.1", "localhost"])


def _note(nid: str, epoch: int, value: str = "v") -> str:
    return "notification: " + json.dumps({
        "id": nid, "from": "@alice", "to": ME, "key": f"{ME}:msg.test@alice", "value": value,
        "operation": "update", "epochMillis": epoch, "messageType": "MessageType.key",
        "isEncrypted": False, "metadata": {"ivNonce": None}}) + "\n"


def _stats(epoch: int) -> str:
    return "notification: " + json.dumps({
        "id": "-1", "from": ME, "to": ME, "key": f"statsNotification.{ME}", "value": "7",
        "operation": "update", "epochMillis": epoch, "messageType": "MessageType.key",
        "isEncrypted": False, "metadata": None}) + "\n"


MonitorScript = Callable[[int, str, asyncio.StreamWriter], Awaitable[None]]


class FakeServer:
    """Just enough of an atServer: greeting, from/pkam, scripted monitor, echo commands."""

    def __init__(self, tls, monitor_script: MonitorScript | None = None,
                 answer_noop: bool | Callable[[int], bool] = True,
                 pkam_ok: bool = True) -> None:
        self.tls = tls
        self.monitor_script = monitor_script
        self.answer_noop = answer_noop
        self.pkam_ok = pkam_ok
        self.monitor_cmds: list[str] = []
        self.connections = 0
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> FakeServer:
        self.server = await asyncio.start_server(
            self._serve, "127.0.0.1", 0, ssl=server_context(self.tls, request_client_cert=False))
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        self.abort_all()

    def abort_all(self) -> None:
        for w in self.writers:
            # Python 3.11.2's SSL transport raises from abort() once it is closed
            if not w.transport.is_closing():
                w.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn_no = self.connections
        self.writers.append(writer)
        writer.write(b"@")
        prompt = "@"
        try:
            while True:
                raw = await reader.readline()
                if not raw:
                    return
                cmd = raw.decode().rstrip("\n")
                if cmd.startswith("from:"):
                    out = f"data:_sid{ME}:proof-{conn_no}\n{prompt}"
                elif cmd.startswith("pkam:"):
                    if self.pkam_ok:
                        prompt = f"{ME}@"
                        out = f"data:success\n{prompt}"
                    else:
                        out = f"error:AT0401-pkam authentication failed\n{prompt}"
                elif cmd.startswith("monitor"):
                    self.monitor_cmds.append(cmd)
                    if self.monitor_script:
                        asyncio.ensure_future(self.monitor_script(len(self.monitor_cmds), cmd,
                                                                  writer))
                    continue
                elif cmd.startswith("noop:"):
                    ok = (self.answer_noop(len(self.monitor_cmds))
                          if callable(self.answer_noop) else self.answer_noop)
                    if not ok:
                        continue
                    out = f"data:ok\n{prompt}"  # Dart framing, even when monitoring
                elif cmd.startswith("echo:"):
                    n = int(cmd.split(":")[1])
                    await asyncio.sleep((n % 3) * 0.003)
                    out = f"data:{n}\n{prompt}"
                elif cmd.startswith("slow:"):
                    await asyncio.sleep(1.0)
                    out = f"data:late\n{prompt}"
                elif cmd == "@exit":
                    return
                else:
                    out = f"error:AT0003-Invalid syntax\n{prompt}"
                writer.write(out.encode())
                await writer.drain()
        except (ConnectionError, OSError):
            return
        finally:
            with contextlib.suppress(Exception):
                writer.close()


async def _client(srv: FakeServer, tls, keys) -> AtClient:
    return await AtClient.connect(ME, keys, ("127.0.0.1", 1), client_context(tls.ca_cert),
                                  secondary=("127.0.0.1", srv.port), timeout=3.0)


async def _take(mon, n: int, timeout: float = 5.0) -> list:
    out = []
    for _ in range(n):
        out.append(await asyncio.wait_for(mon.__anext__(), timeout))
    return out


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_heartbeat_timeout_reconnects_and_replays_exactly_once(tls, keys):
    async def script(no: int, cmd: str, w: asyncio.StreamWriter) -> None:
        if no == 1:
            w.write((_note("n1", 1000) + _note("n2", 1000)).encode())
            # ...and then the server goes silent (noops are not answered on connection 1)
        else:
            # replay (server: strictly after the epoch): duplicates, one more in the same
            # millisecond, and a later one
            w.write((_note("n1", 1000) + _note("n2", 1000) + _note("n3", 1000)
                     + _note("n4", 1005)).encode())

    async def main() -> None:
        srv = await FakeServer(tls, script, answer_noop=lambda mons: mons > 1).start()
        client = await _client(srv, tls, keys)
        mon = client.monitor(".*", heartbeat_s=0.15, heartbeat_timeout_s=0.15,
                             backoff_base_s=0.01)
        await mon.wait_ready(5)
        got = await _take(mon, 4)
        assert [n.id for n in got] == ["n1", "n2", "n3", "n4"]
        assert all(n.value == "v" for n in got)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(mon.__anext__(), 0.5)  # no duplicates trail in
        assert srv.monitor_cmds[0] == "monitor .*"
        assert srv.monitor_cmds[1] == "monitor:999 .*"  # 1 ms overlap for same-ms arrivals
        assert mon.connects == 2 and mon.cursor == 1005
        await client.close()
        await srv.stop()

    run(main())


def test_eof_reconnect_uses_stats_cursor_and_tolerates_dart_framing(tls, keys):
    async def script(no: int, cmd: str, w: asyncio.StreamWriter) -> None:
        if no == 1:
            w.write(_stats(5000).encode())
            await w.drain()
            await asyncio.sleep(0.3)  # let heartbeats be answered with `data:ok\n@bob@`
            w.write(_note("a", 5001).encode())  # arrives glued to the prompt
            await w.drain()
            await asyncio.sleep(0.1)
            w.transport.abort()  # the server dies
        else:
            w.write((_note("a", 5001) + _note("b", 5002)).encode())

    async def main() -> None:
        srv = await FakeServer(tls, script).start()
        client = await _client(srv, tls, keys)
        mon = client.monitor(None, heartbeat_s=0.05, heartbeat_timeout_s=1.0,
                             backoff_base_s=0.01)
        got = await _take(mon, 2)
        assert [n.id for n in got] == ["a", "b"]
        assert srv.monitor_cmds == ["monitor", "monitor:5000"]  # cursor 5001 - 1
        await mon.aclose()
        with pytest.raises(StopAsyncIteration):
            await mon.__anext__()
        await client.close()
        await srv.stop()

    run(main())


def test_since_ms_replays_and_is_a_floor(tls, keys):
    async def script(no: int, cmd: str, w: asyncio.StreamWriter) -> None:
        w.write((_note("old", 100) + _note("new", 201)).encode())  # a sloppy server

    async def main() -> None:
        srv = await FakeServer(tls, script).start()
        client = await _client(srv, tls, keys)
        async with client.monitor("msg", since_ms=200) as mon:
            got = await _take(mon, 1)
            assert got[0].id == "new"
            assert srv.monitor_cmds == ["monitor:200 msg"]
        await client.close()
        await srv.stop()

    run(main())


def test_cancelled_consumer_does_not_hurt_the_monitor(tls, keys):
    async def main() -> None:
        release = asyncio.Event()

        async def script(no: int, cmd: str, w: asyncio.StreamWriter) -> None:
            await release.wait()
            w.write(_note("late", 10).encode())

        srv = await FakeServer(tls, script).start()
        client = await _client(srv, tls, keys)
        mon = client.monitor(".*")
        await mon.wait_ready(5)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(mon.__anext__(), 0.1)
        release.set()
        got = await _take(mon, 1)
        assert got[0].id == "late" and mon.connects == 1
        await client.close()  # also stops the monitor
        assert mon._task is not None and mon._task.done()
        await srv.stop()

    run(main())


def test_close_ends_a_monitor_that_lost_its_cancellation(tls, keys, monkeypatch):
    """The load-test hang: sshnp's asyncio.run() waited forever at exit for a monitor that
    had swallowed its cancellation (Python < 3.12 asyncio.wait_for, CPython gh-86296, hit
    when the read completes just as the cancel comes) and kept reading heartbeats."""
    lost: list[int] = []
    orig = aio._Stream.read_line

    async def lossy_read_line(self, timeout):  # noqa: ANN001, ANN202
        try:
            return await orig(self, timeout)
        except asyncio.CancelledError:
            if lost:
                raise
            lost.append(1)
            return "data:ok"  # what the racing read returned; the cancellation is gone

    monkeypatch.setattr(aio._Stream, "read_line", lossy_read_line)

    async def main() -> None:
        srv = await FakeServer(tls).start()
        client = await _client(srv, tls, keys)
        mon = client.monitor(".*", heartbeat_s=0.2)
        await mon.wait_ready(5)
        closing = asyncio.ensure_future(client.close())
        # asyncio.wait, not wait_for: its cancel on timeout would end the monitor for us
        done, _ = await asyncio.wait({closing}, timeout=10)
        assert closing in done, "close() hung on a monitor that ignored its cancellation"
        assert lost == [1]  # the first cancellation really was swallowed
        assert mon._task is not None and mon._task.done()
        await srv.stop()

    run(main())


def test_commands_are_serialised_and_reconnect_lazily(tls, keys):
    async def main() -> None:
        srv = await FakeServer(tls).start()
        client = await _client(srv, tls, keys)
        results = await asyncio.gather(*(client.command(f"echo:{i}") for i in range(30)))
        assert results == [str(i) for i in range(30)]
        with pytest.raises(AtProtocolError) as ei:
            await client.command("bogus")
        assert ei.value.code == "AT0003"
        assert await client.command("echo:5") == "5"  # still in step after an error
        srv.abort_all()
        await asyncio.sleep(0.05)
        assert await client.command("echo:7", retry=True) == "7"
        assert srv.connections == 2
        # a timed-out request leaves the stream out of step: it is dropped and re-opened
        with pytest.raises(aio.AtTimeoutError):
            await client.command("slow:1", timeout=0.2)
        assert await client.command("echo:8") == "8"
        assert srv.connections == 3
        await client.close()
        with pytest.raises(aio.AtConnectError):
            await client.command("echo:1")
        await srv.stop()

    run(main())


def test_auth_failure_is_reported_not_retried(tls, keys):
    async def main() -> None:
        srv = await FakeServer(tls, pkam_ok=False).start()
        with pytest.raises(AtProtocolError) as ei:
            await _client(srv, tls, keys)
        assert ei.value.code == "AT0401"
        good = await FakeServer(tls).start()
        client = await _client(good, tls, keys)
        client.secondary = ("127.0.0.1", srv.port)  # monitor goes to the refusing server
        mon = client.monitor(".*", backoff_base_s=0.01)
        with pytest.raises(AtProtocolError):
            await mon.wait_ready(5)
        assert srv.connections == 2  # one attempt for connect, one for the monitor
        await client.close()
        await srv.stop()
        await good.stop()

    run(main())


def test_keys_for_another_atsign_are_refused(keys):
    with pytest.raises(ValueError):
        AtClient("@alice", keys)
