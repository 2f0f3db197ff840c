"""The asyncio client against the REAL plane (directory + two atserver processes).

(a) our client notifies, the official SDK (`at_client`, separate process) decrypts;
(b) the SDK notifies, our monitor decrypts;
(c) our client -> our client across processes, with timings printed (not asserted);
(d) our monitor survives `kill -9` + restart of the recipient's atServer and yields every
    notification sent before, during and after the outage exactly once.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import statistics
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from noports.atclient import aio
from noports.atclient.aio import AtClient
from noports.keys.atkeys import AtKeys
from tests.harness.plane import Plane

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]

SDK_RECEIVE = textwrap.dedent('''
    import json, queue, sys, threading, time
    from at_client import AtClient
    from at_client.common import AtSign
    from at_client.common.keys import PublicKey, SharedKey
    from at_client.connections.address import Address
    from at_client.connections.notification.atevents import AtEventType
    host, port, me, sender, tag, want = sys.argv[1:7]
    q = queue.Queue()
    c = AtClient(AtSign(me), root_address=Address(host, int(port)), queue=q)
    out = {"shared": c.get(SharedKey("shared" + tag, AtSign(sender), AtSign(me))),
           "public": c.get(PublicKey("public" + tag, AtSign(sender))), "notes": {}}
    threading.Thread(target=c.start_monitor, daemon=True).start()   # monitor:0 .* replays
    deadline = time.time() + 30
    while time.time() < deadline and len(out["notes"]) < int(want):
        try:
            ev = q.get(timeout=0.5)
        except queue.Empty:
            continue
        if ev.event_type == AtEventType.UPDATE_NOTIFICATION:
            c.handle_event(q, ev)
        elif ev.event_type == AtEventType.DECRYPTED_UPDATE_NOTIFICATION:
            if tag in ev.event_data["key"]:
                out["notes"][ev.event_data["key"]] = ev.event_data["decryptedValue"]
    print(json.dumps(out)); sys.stdout.flush()
''')

SDK_SEND = textwrap.dedent('''
    import json, sys
    from at_client import AtClient
    from at_client.common import AtSign
    from at_client.common.keys import SharedKey
    from at_client.connections.address import Address
    host, port, me, to, tag = sys.argv[1:6]
    c = AtClient(AtSign(me), root_address=Address(host, int(port)))
    c.put(SharedKey("shared" + tag, AtSign(me), AtSign(to)), "sdk shared " + tag)
    ids = []
    for i in range(2):
        k = SharedKey(f"msg{i}{tag}", AtSign(me), AtSign(to))
        k.set_namespace("test")
        ids.append(c.notify(k, f"from sdk {i} {tag} é🛠"))
    print(json.dumps(ids)); sys.stdout.flush()
''')

# A receiver in its own process: cold start -> connected -> monitor ready, then one JSON line
# per notification with its arrival time.
OUR_RECEIVER = textwrap.dedent('''
    import time
    t0 = time.perf_counter()
    import asyncio, json, sys
    from noports.atclient.aio import AtClient
    from noports.keys.atkeys import load_atkeys
    from noports.keys.ca import client_context
    t_import = time.perf_counter()
    host, port, keyfile, ca = sys.argv[1:5]
    async def main():
        keys = load_atkeys(keyfile)
        t1 = time.perf_counter()
        c = await AtClient.connect(keys.atsign, keys, (host, int(port)), client_context(ca))
        t2 = time.perf_counter()
        mon = c.monitor(r"\\.lat@")
        await mon.wait_ready(10)
        t3 = time.perf_counter()
        print("READY " + json.dumps({"import_ms": (t_import - t0) * 1000,
                                     "connect_ms": (t2 - t1) * 1000,
                                     "monitor_ms": (t3 - t2) * 1000}), flush=True)
        async for n in mon:
            print(json.dumps({"t": time.time(), "id": n.id, "value": n.value}), flush=True)
    asyncio.run(main())
''')


class Env:
    def __init__(self, plane: Plane, home: Path, keys: dict[str, AtKeys]) -> None:
        self.plane = plane
        self.home = home
        self.keys = keys
        self.root = plane.root_tuple
        self.ctx = plane.ssl_context()

    async def client(self, atsign: str) -> AtClient:
        return await AtClient.connect(atsign, self.keys[atsign], self.root, self.ctx)

    def run_py(self, code: str, *args: str, timeout: float = 60) -> str:
        res = subprocess.run([sys.executable, "-c", code, *self.root_args(), *args],
                             capture_output=True, text=True, timeout=timeout,
                             env=self.plane.client_env(self.home), cwd=ROOT)
        assert res.returncode == 0, f"subprocess failed:\n{res.stdout}\n{res.stderr[-3000:]}"
        return res.stdout.strip().splitlines()[-1]

    def root_args(self) -> list[str]:
        return [self.root[0], str(self.root[1])]


def _make_env(base: Path, servers: dict[str, list[str]]) -> Env:
    home = base / "home"
    plane = Plane(base / "plane", keys_dir=home / ".atsign" / "keys")
    return Env(plane, home, plane.populate(servers))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = _make_env(tmp_path_factory.mktemp("aio"),
                  {"server1": ["@alice", "@carol"], "server2": ["@bob"]})
    yield e
    e.plane.stop()


def test_our_notifications_decrypt_in_the_sdk(env):
    tag = uuid.uuid4().hex[:8]

    async def send() -> list[str]:
        async with await env.client("@alice") as alice:
            await alice.put_shared("@bob", "shared" + tag, "our shared " + tag)
            await alice.put_public("public" + tag, "our public " + tag)
            return [await alice.notify("@bob", f"msg{i}{tag}", f"from us {i} é🛠",
                                       namespace="test") for i in range(3)]

    ids = asyncio.run(send())
    assert len(set(ids)) == 3
    out = json.loads(env.run_py(SDK_RECEIVE, "@bob", "@alice", tag, "4"))
    assert out["shared"] == "our shared " + tag
    assert out["public"] == "our public " + tag
    want = {f"@bob:msg{i}{tag}.test@alice": f"from us {i} é🛠" for i in range(3)}
    # the server auto-notifies our shared put: its value decrypts in the SDK as well
    want[f"@bob:shared{tag}@alice"] = "our shared " + tag
    assert out["notes"] == want


def test_sdk_notifications_decrypt_in_our_monitor(env):
    tag = uuid.uuid4().hex[:8]

    async def main() -> None:
        async with await env.client("@bob") as bob:
            mon = bob.monitor(tag)
            await mon.wait_ready(10)
            ids = json.loads(await asyncio.to_thread(env.run_py, SDK_SEND, "@carol", "@bob", tag))
            got = {}  # the two notifications plus the server's autoNotify of the shared put
            while len(got) < 3:
                n = await asyncio.wait_for(mon.__anext__(), 20)
                got[n.key] = n
            assert {got[f"@bob:msg{i}{tag}.test@carol"].id for i in range(2)} == set(ids)
            for i in range(2):
                n = got[f"@bob:msg{i}{tag}.test@carol"]
                assert n.value == f"from sdk {i} {tag} é🛠", n.error
                assert n.from_atsign == "@carol" and n.to_atsign == "@bob" and n.is_encrypted
            assert got[f"@bob:shared{tag}@carol"].value == "sdk shared " + tag
            # and a value the SDK put as a shared key reads back here (lookup:all + ivNonce)
            assert await bob.get_shared("shared" + tag, shared_by="@carol") == "sdk shared " + tag

    asyncio.run(main())


def test_our_client_to_our_client_across_processes_with_timings(env):
    keyfile = env.home / ".atsign" / "keys" / "@bob_key.atKeys"
    t_spawn = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", OUR_RECEIVER, *env.root_args(), str(keyfile),
         str(env.plane.tls.ca_cert)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, cwd=ROOT)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    try:
        try:
            first = lines.get(timeout=20)
        except queue.Empty:
            proc.kill()
            pytest.fail(f"receiver never became ready:\n{proc.stderr.read()[-3000:]}")
        t_ready = time.perf_counter()
        assert first.startswith("READY "), first
        child = json.loads(first[6:])

        async def send() -> tuple[float, list[float]]:
            aio._directory_cache.clear()  # measure the full start-up: lookup, TLS, from, pkam
            t0 = time.perf_counter()
            alice = await env.client("@alice")
            connect_ms = (time.perf_counter() - t0) * 1000
            lat = []
            await alice.notify("@bob", "warm", "x", namespace="lat")  # shared key lookup
            await asyncio.to_thread(lines.get, True, 10)
            for i in range(20):
                t_send = time.time()
                await alice.notify("@bob", f"p{i}", f"ping {i}", namespace="lat")
                got = json.loads(await asyncio.to_thread(lines.get, True, 10))
                assert got["value"] == f"ping {i}"
                lat.append((got["t"] - t_send) * 1000)
            await alice.close()
            return connect_ms, lat

        connect_ms, lat = asyncio.run(send())
        print(f"\n[aio timings] receiver process: import {child['import_ms']:.0f} ms, "
              f"connect+pkam {child['connect_ms']:.1f} ms, monitor ready "
              f"{child['monitor_ms']:.1f} ms, spawn->ready {(t_ready - t_spawn) * 1000:.0f} ms")
        print(f"[aio timings] sender connect+pkam (warm process, incl. directory lookup) "
              f"{connect_ms:.1f} ms")
        print(f"[aio timings] notify->monitor across two atserver processes: median "
              f"{statistics.median(lat):.1f} ms, max {max(lat):.1f} ms, n={len(lat)}")
    finally:
        proc.kill()
        proc.wait(5)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _settled_fds(timeout: float = 10.0) -> int:
    """The open fd count once it stops changing: a closed client's transports finish closing
    a few loop turns later (under load, later still), so an early count includes them."""
    deadline = time.monotonic() + timeout
    last = _open_fds()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        now = _open_fds()
        if now == last:
            return now
        last = now
    return last


def test_many_clients_in_one_event_loop_concurrently_and_sequentially(env):
    """Issue 9 point 9: 20 clients at once, then 20 one after another, in ONE loop; each
    authenticates (pkam) and does a real lookup that crosses to the other atServer. No fd
    is left behind (a leaked transport would also make a later connection of the loop fail
    with "File descriptor N is used by transport")."""
    async def one(i: int) -> None:
        async with await env.client("@alice") as alice:
            assert await alice.public_key("@bob") == env.keys["@bob"].encrypt_public
            assert (await alice.command("scan")).startswith("[")

    async def main() -> tuple[int, int, int]:
        await one(-1)  # warm: directory cache, lazily created loop fds
        before = await _settled_fds()
        results = await asyncio.gather(*(one(i) for i in range(20)), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, errors[:3]
        after_gather = await _settled_fds()
        for i in range(20):
            await one(i)
        return before, after_gather, await _settled_fds()

    before, after_gather, after_seq = asyncio.run(main())
    assert after_gather == before, (before, after_gather)
    assert after_seq == before, (before, after_seq)


async def _hostile_server(env, behaviour: str) -> asyncio.AbstractServer:
    """A real TLS endpoint (the plane's certificate) that greets and then misbehaves."""
    from noports.keys.ca import server_context

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(b"@")
            await reader.readline()  # the client's `from:`
            if behaviour == "flood":  # one reply longer than the client's bound, no newline
                chunk = b"x" * (1 << 20)
                writer.write(b"data:")
                for _ in range(aio.STREAM_LIMIT // len(chunk) + 2):
                    writer.write(chunk)
                    await writer.drain()
            else:  # "drip": a byte at a time, never a whole reply
                for _ in range(100):
                    writer.write(b"d")
                    await writer.drain()
                    await asyncio.sleep(0.1)
        except (OSError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0,
                                      ssl=server_context(env.plane.tls, False))


@pytest.mark.parametrize("behaviour, error, message", [
    ("flood", aio.AtProtocolError, "over-long line: reply longer than 33554432 bytes"),
    ("drip", aio.AtTimeoutError, "no reply from 127.0.0.1:.* to 'from' within 1s"),
])
def test_hostile_server_fails_one_client_and_others_keep_being_served(env, behaviour, error,
                                                                       message):
    """An atServer that floods one endless reply or drips bytes: that client fails with a
    message naming the limit / the wait, and a client of the same loop keeps working."""
    async def main() -> None:
        server = await _hostile_server(env, behaviour)
        port = server.sockets[0].getsockname()[1]
        try:
            async with await env.client("@alice") as good:
                async def victim() -> None:
                    await AtClient.connect("@alice", env.keys["@alice"], env.root, env.ctx,
                                           secondary=("127.0.0.1", port), timeout=1.0)

                task = asyncio.ensure_future(victim())
                served = 0
                while not task.done():
                    assert (await good.command("plookup:publickey@bob")).strip() == \
                        env.keys["@bob"].encrypt_public
                    served += 1
                with pytest.raises(error, match=message):
                    await task
                assert served >= 1
                assert (await good.command("scan")).startswith("[")
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())


@pytest.fixture
def restart_env(tmp_path):
    e = _make_env(tmp_path, {"server1": ["@alice"], "server2": ["@bob"]})
    yield e
    e.plane.stop()


def test_monitor_survives_kill9_and_restart_exactly_once(restart_env):
    env = restart_env
    server2 = next(s for s in env.plane.servers if "@bob" in s.ports)

    async def main() -> None:
        alice = await env.client("@alice")
        bob = await env.client("@bob")
        mon = bob.monitor(r"\.outage@", backoff_base_s=0.1, backoff_max_s=1.0)
        await mon.wait_ready(10)
        received: list = []

        async def collect() -> None:
            async for n in mon:
                received.append(n)

        collector = asyncio.create_task(collect())

        async def wait_for_count(k: int, timeout: float) -> None:
            deadline = time.monotonic() + timeout
            while len(received) < k and time.monotonic() < deadline:
                await asyncio.sleep(0.05)

        await alice.notify("@bob", "before", "before", namespace="outage")
        await wait_for_count(1, 10)
        assert [n.value for n in received] == ["before"]

        await asyncio.to_thread(server2.proc.kill9)
        for i in range(2):  # queued on @alice's server while @bob's is down
            await alice.notify("@bob", f"during{i}", f"during{i}", namespace="outage")
        await asyncio.sleep(0.5)
        t_restart = time.perf_counter()
        await asyncio.to_thread(env.plane.start_atserver, "server2", None, server2)
        await alice.notify("@bob", "after", "after", namespace="outage")
        await wait_for_count(4, 25)
        recovered_ms = (time.perf_counter() - t_restart) * 1000
        await asyncio.sleep(1.5)  # anything duplicated would arrive by now
        assert sorted(n.value for n in received) == ["after", "before", "during0", "during1"]
        assert len({n.id for n in received}) == len(received) == 4
        assert mon.connects >= 2
        assert await bob.command("noop:0", retry=True) == "ok"  # the command side recovers too
        print(f"\n[aio restart] all 4 received {recovered_ms:.0f} ms after restart began; "
              f"monitor connects={mon.connects}")
        collector.cancel()
        await alice.close()
        await bob.close()

    asyncio.run(main())
