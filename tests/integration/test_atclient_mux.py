"""One atServer connection for commands AND the monitor (noports.atclient.mux, decision 0031)
against the REAL plane (directory + two atserver processes):

(a) a MuxClient runs its monitor and many concurrent commands on ONE TLS connection with ONE
    PKAM login while notifications stream in: every command gets its own answer, every
    notification arrives once (the server's log and this process's sockets are counted);
(b) hostile: a monitor connection that also sends verbs, garbage, invalid UTF-8 and finally a
    line over --max-buffer keeps getting its notifications and answers until the over-long
    line closes it (AT0005, as the official server does), while another client is served;
(c) the connection is cut (its atServer killed with -9 and restarted): exactly one re-login,
    the monitor resumes from the last notification it saw: nothing lost, nothing twice;
(d) the connection is cut by a proxy while the atServer stays up: one re-login, and what was
    stored for @bob while nobody monitored is replayed once, in order.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from noports.atclient.aio import AtClient
from noports.atclient.mux import MuxClient
from tests.harness.plane import Plane

pytestmark = pytest.mark.integration


class Env:
    def __init__(self, base: Path) -> None:
        self.plane = Plane(base / "plane", keys_dir=base / "keys")
        self.keys = self.plane.populate({"server1": ["@alice"], "server2": ["@bob"]})
        self.root = self.plane.root_tuple
        self.ctx = self.plane.ssl_context()

    @property
    def bob_server(self):  # noqa: ANN201 - harness AtServer
        return next(s for s in self.plane.servers if "@bob" in s.ports)

    def bob_logins(self, since: int = 0) -> int:
        return sum(1 for ln in self.bob_server.proc.lines[since:] if "@bob: pkam login" in ln)

    async def alice(self) -> AtClient:
        return await AtClient.connect("@alice", self.keys["@alice"], self.root, self.ctx)

    def bob(self, **kw) -> MuxClient:  # noqa: ANN003
        return MuxClient("@bob", self.keys["@bob"], self.root, self.ctx, **kw)


@pytest.fixture
def env(tmp_path: Path):
    e = Env(tmp_path)
    yield e
    e.plane.stop()


def _tcp_connections_to(port: int) -> int:
    """Established TCP connections of THIS process to `port` (from /proc, no helper)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    n = 0
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if f[3] == "01" and int(f[2].rsplit(":", 1)[1], 16) == port and f[9] in inodes:
                n += 1
    return n


async def _collect(mon, out: list) -> None:  # noqa: ANN001
    async for n in mon:
        out.append(n)


async def _until(pred, timeout: float) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


def test_commands_and_monitor_share_one_connection_and_one_login(env: Env) -> None:
    mark = len(env.bob_server.proc.lines)

    async def main() -> None:
        alice = await env.alice()
        bob = env.bob()
        mon = bob.monitor(r"\.mux@")
        await mon.wait_ready(10)
        got: list = []
        collector = asyncio.create_task(_collect(mon, got))

        async def send(i: int) -> None:
            await alice.notify("@bob", f"n{i}", f"value {i}", namespace="mux")

        async def roundtrip(i: int) -> str:
            await bob.put_self(f"k{i}", f"self value {i}", namespace="mux")
            return await bob.get_self(f"k{i}", namespace="mux") or ""

        # notifications land between bob's commands and their answers
        sends = asyncio.gather(*(send(i) for i in range(20)))
        answers = await asyncio.gather(*(roundtrip(i) for i in range(30)))
        await sends
        assert answers == [f"self value {i}" for i in range(30)]
        await _until(lambda: len(got) >= 20, 20)
        await asyncio.sleep(0.5)  # a duplicate would arrive by now
        assert sorted(n.value for n in got) == sorted(f"value {i}" for i in range(20))
        assert len({n.id for n in got}) == 20
        assert bob.logins == 1 and mon.connects == 1
        assert _tcp_connections_to(env.bob_server.ports["@bob"]) == 1
        collector.cancel()
        await bob.close()
        await alice.close()

    asyncio.run(main())
    assert env.bob_logins(mark) == 1


def test_hostile_monitor_connection_does_not_stop_it_or_others(env: Env) -> None:
    async def main() -> None:
        alice = await env.alice()
        bob = env.bob()
        stream = await bob._open_authenticated()  # a raw, logged-in connection
        framer = stream.framer

        async def read_until(done, timeout: float = 10) -> list:  # noqa: ANN001
            """Replies (prompts dropped, stats lines too) until done(replies) or EOF."""
            out: list = []
            deadline = time.monotonic() + timeout
            while not done(out) and time.monotonic() < deadline:
                chunk = await asyncio.wait_for(stream.reader.read(65536),
                                               max(deadline - time.monotonic(), 0.01))
                if not chunk:
                    break
                out += [r for r in framer.feed(chunk) if r.kind != "prompt"
                        and "statsNotification" not in r.text]
            return out

        def answers(got: list) -> list:
            return [r for r in got if r.kind != "notification"]

        def notes(got: list) -> list:
            return [r for r in got if r.kind == "notification"]

        stream.writer.write(b"monitor \\.hostile@\n")
        await asyncio.sleep(0.2)
        await alice.notify("@bob", "one", "1", namespace="hostile")
        got = await read_until(lambda g: notes(g))
        assert [r.kind for r in got] == ["notification"]
        # verbs, garbage and invalid UTF-8 on the monitor connection: answered in order,
        # while notifications keep coming
        stream.writer.write(b"noop:0\n")
        stream.writer.write(b"this is not a verb\n")
        stream.writer.write(b"\xff\xfe\xfd\n")
        stream.writer.write(b"llookup:public:publickey@bob\n")
        await alice.notify("@bob", "two", "2", namespace="hostile")
        got = await read_until(lambda g: len(answers(g)) >= 4 and notes(g))
        assert len(notes(got)) == 1, got
        assert [r.kind for r in answers(got)] == ["data", "error", "error", "data"], got
        assert answers(got)[0].text == "ok" and answers(got)[3].text.startswith("MII")
        # one line over --max-buffer (10,240,000 bytes): AT0005, then the server hangs up
        stream.writer.write(b"update:public:x@bob " + b"A" * 10_300_000 + b"\n")
        other = await env.alice()
        assert await other.command("noop:0") == "ok"  # served meanwhile
        tail = answers(await read_until(lambda g: answers(g), timeout=30))
        assert tail and tail[-1].kind == "error" and tail[-1].text.startswith("AT0005"), tail
        try:
            rest = await stream.reader.read(65536)
        except ConnectionResetError:
            # the server hung up with the rest of our 10 MB line unread in its socket buffer:
            # the kernel then sends a reset, not a FIN; both are the hang-up
            rest = b""
        assert rest == b""
        # everyone else is still served, including a new monitor of the same atSign
        mon = bob.monitor(r"\.hostile@")
        await mon.wait_ready(10)
        seen: list = []
        collector = asyncio.create_task(_collect(mon, seen))
        await alice.notify("@bob", "three", "3", namespace="hostile")
        await _until(lambda: seen, 10)
        assert [n.value for n in seen] == ["3"]
        collector.cancel()
        stream.close()
        for c in (bob, alice, other):
            await c.close()

    asyncio.run(main())


def test_cut_connection_one_relogin_monitor_resumes_exactly_once(env: Env) -> None:
    server = env.bob_server

    async def main() -> None:
        alice = await env.alice()
        bob = env.bob()
        mon = bob.monitor(r"\.cut@", backoff_base_s=0.1, backoff_max_s=1.0)
        await mon.wait_ready(10)
        got: list = []
        collector = asyncio.create_task(_collect(mon, got))
        await alice.notify("@bob", "before", "before", namespace="cut")
        await _until(lambda: len(got) >= 1, 10)
        assert [n.value for n in got] == ["before"] and bob.logins == 1

        await asyncio.to_thread(server.proc.kill9)  # the connection is cut
        for i in range(2):  # held by @alice's server while @bob's is down
            await alice.notify("@bob", f"during{i}", f"during{i}", namespace="cut")
        await asyncio.sleep(0.5)
        await asyncio.to_thread(env.plane.start_atserver, "server2", None, server)
        await alice.notify("@bob", "after", "after", namespace="cut")
        await _until(lambda: len(got) >= 4, 25)
        assert await bob.command("noop:0", retry=True) == "ok"
        await asyncio.sleep(1.0)  # a duplicate would arrive by now
        assert sorted(n.value for n in got) == ["after", "before", "during0", "during1"]
        assert len({n.id for n in got}) == 4
        assert bob.logins == 2, bob.logins  # the first one and ONE re-login
        assert mon.connects == 2
        restarted = env.bob_server
        assert _tcp_connections_to(restarted.ports["@bob"]) == 1
        collector.cancel()
        await bob.close()
        await alice.close()

    asyncio.run(main())
    assert env.bob_logins() == 1  # the restarted server's log: one login of @bob



class _CuttableProxy:
    """A TCP forwarder in front of an atServer port whose live connections can be cut
    (both sides closed) while the atServer itself stays up."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection("127.0.0.1", self.port)
        self.writers += [cw, sw]

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except OSError:
                pass
            finally:
                w.close()

        await asyncio.gather(pipe(cr, sw), pipe(sr, cw))

    def cut(self) -> None:
        for w in self.writers:
            w.transport.abort()
        self.writers.clear()

    def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()


def test_cut_while_the_server_stays_up_replays_what_was_stored_meanwhile(env: Env) -> None:
    mark = len(env.bob_server.proc.lines)

    async def main() -> None:
        proxy = _CuttableProxy(env.bob_server.ports["@bob"])
        port = await proxy.start()
        alice = await env.alice()
        bob = env.bob(secondary=("127.0.0.1", port))
        # a long first back-off: the notifications below are stored while nobody monitors
        mon = bob.monitor(r"\.gap@", backoff_base_s=2.0, backoff_max_s=2.0)
        await mon.wait_ready(10)
        got: list = []
        collector = asyncio.create_task(_collect(mon, got))
        await alice.notify("@bob", "before", "before", namespace="gap")
        await _until(lambda: len(got) >= 1, 10)
        proxy.cut()
        for i in range(3):
            await alice.notify("@bob", f"gap{i}", f"gap{i}", namespace="gap")
        await _until(lambda: len(got) >= 4, 20)
        await alice.notify("@bob", "after", "after", namespace="gap")
        await _until(lambda: len(got) >= 5, 10)
        await asyncio.sleep(1.0)  # a duplicate would arrive by now
        assert [n.value for n in got] == ["before", "gap0", "gap1", "gap2", "after"]
        assert bob.logins == 2 and mon.connects == 2
        collector.cancel()
        await bob.close()
        await alice.close()
        proxy.close()

    asyncio.run(main())
    assert env.bob_logins(mark) == 2  # the first login and one re-login, none per command
