"""The relay over real loopback sockets: pairing, auth, timeouts, lifetimes, backpressure."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import socket
import time
import tracemalloc
from collections.abc import Awaitable, Callable

import pytest

from noports.relay import RelayCapacityError, RelayConfig, Rendezvous, SessionPolicy
from noports.relay.splice import HAS_OS_SPLICE, READ_SIZE

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"
KEY = b"test-relay-key"
MODES = ["protocol"] + (["os_splice"] if HAS_OS_SPLICE else [])


def token(session_id: str, side: str) -> bytes:
    return hmac.new(KEY, f"{session_id}:{side}".encode(), "sha256").hexdigest().encode()


def hmac_auth(session_id: str, side: str) -> Callable[[bytes], bool]:
    """Stand-in for the envelope verifier: an HMAC over (session, side)."""
    expected = token(session_id, side)
    return lambda line: hmac.compare_digest(line, expected)


def cfg(mode: str = "protocol", **policy: float) -> RelayConfig:
    pol = {"auth_timeout": 2.0, "unpaired_timeout": 5.0, **policy}
    return RelayConfig(bind_host=HOST, splice_mode=mode, policy=SessionPolicy(**pol))  # type: ignore[arg-type]


def run(coro_fn: Callable[[], Awaitable[None]], timeout: float = 20.0) -> None:
    asyncio.run(asyncio.wait_for(coro_fn(), timeout))


async def connect(port: int, line: bytes | None) -> tuple[asyncio.StreamReader,
                                                            asyncio.StreamWriter]:
    r, w = await asyncio.open_connection(HOST, port)
    if line is not None:
        w.write(line + b"\n")
    return r, w


async def open_pair(rv: Rendezvous, sid: str) -> tuple[tuple, tuple]:
    pa, pb = await rv.open_session(sid, hmac_auth(sid, "a"), hmac_auth(sid, "b"))
    a = await connect(pa, token(sid, "a"))
    b = await connect(pb, token(sid, "b"))
    return a, b


async def closed_by_relay(reader: asyncio.StreamReader, within: float) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), within) == b""
    except ConnectionResetError:
        return True
    except asyncio.TimeoutError:
        return False


async def wait_for(pred: Callable[[], bool], within: float = 3.0) -> None:
    deadline = time.monotonic() + within
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("mode", MODES)
def test_pair_exchange_both_ways_64mib(mode: str) -> None:
    async def main() -> None:
        closed: list = []
        async with Rendezvous(cfg(mode), on_session_closed=closed.append) as rv:
            (ra, wa), (rb, wb) = await open_pair(rv, "s1")
            wa.write(b"hello from A")
            wb.write(b"hello from B")
            assert await rb.readexactly(12) == b"hello from A"
            assert await ra.readexactly(12) == b"hello from B"

            size = 64 << 20
            blob_ab, blob_ba = os.urandom(size), os.urandom(size)

            async def send(w: asyncio.StreamWriter, blob: bytes) -> None:
                w.write(blob)
                await w.drain()
                w.write_eof()

            async def digest(r: asyncio.StreamReader) -> tuple[int, str]:
                h, n = hashlib.sha256(), 0
                while chunk := await r.read(1 << 20):
                    h.update(chunk)
                    n += len(chunk)
                return n, h.hexdigest()

            _, _, (nb, hb), (na, ha) = await asyncio.gather(
                send(wa, blob_ab), send(wb, blob_ba), digest(rb), digest(ra))
            assert (nb, hb) == (size, hashlib.sha256(blob_ab).hexdigest())
            assert (na, ha) == (size, hashlib.sha256(blob_ba).hexdigest())
            wa.close()
            wb.close()
            await wait_for(lambda: rv.stats()["pairs"] == 0)
        assert closed and closed[0].bytes_ab == size + 12 and closed[0].bytes_ba == size + 12

    run(main, 30)


@pytest.mark.parametrize("mode", MODES)
def test_unauthenticated_side_dropped_never_paired(mode: str) -> None:
    async def main() -> None:
        async with Rendezvous(cfg(mode)) as rv:
            pa, pb = await rv.open_session("s2", hmac_auth("s2", "a"), hmac_auth("s2", "b"))
            bad_r, bad_w = await connect(pa, token("s2", "b"))  # B's token on port A
            bad_w.write(b"SHOULD NEVER ARRIVE")
            assert await closed_by_relay(bad_r, 2.0)
            too_long_r, too_long_w = await connect(pa, None)
            too_long_w.write(b"x" * 5000)  # no newline within 4 KiB
            assert await closed_by_relay(too_long_r, 2.0)
            rb, wb = await connect(pb, token("s2", "b"))
            ra, wa = await connect(pa, token("s2", "a"))
            wa.write(b"good")
            assert await rb.readexactly(4) == b"good"
            for w in (bad_w, too_long_w, wa, wb):
                w.close()

    run(main)


def test_auth_timeout() -> None:
    async def main() -> None:
        async with Rendezvous(cfg(auth_timeout=0.3)) as rv:
            pa, _pb = await rv.open_session("s3", hmac_auth("s3", "a"), hmac_auth("s3", "b"))
            r, w = await connect(pa, None)
            w.write(b'{"payload":')  # starts, never finishes its line
            t0 = time.monotonic()
            assert await closed_by_relay(r, 3.0)
            assert 0.25 <= time.monotonic() - t0 < 2.0
            w.close()

    run(main)


@pytest.mark.parametrize("mode", MODES)
def test_fifo_pairing_of_several_pairs(mode: str) -> None:
    async def main() -> None:
        async with Rendezvous(cfg(mode)) as rv:
            sid = "s4"
            pa, pb = await rv.open_session(sid, hmac_auth(sid, "a"), hmac_auth(sid, "b"))
            clients = []
            for i in range(5):
                r, w = await connect(pa, token(sid, "a"))
                w.write(f"client-{i}".encode())
                await w.drain()
                await wait_for(lambda n=i + 1: rv.stats()["pending"] == n)
                clients.append((r, w))
            devices = []
            for _ in range(5):
                r, w = await connect(pb, token(sid, "b"))
                devices.append((r, w))
            got = [(await r.readexactly(8)).decode() for r, _w in devices]
            assert got == [f"client-{i}" for i in range(5)]
            for _r, w in clients + devices:
                w.close()

    run(main)


def test_unpaired_session_closes_after_timeout() -> None:
    async def main() -> None:
        closed: list = []
        async with Rendezvous(cfg(unpaired_timeout=0.4), on_session_closed=closed.append) as rv:
            pa, pb = await rv.open_session("s5", hmac_auth("s5", "a"), hmac_auth("s5", "b"))
            r, w = await connect(pa, token("s5", "a"))  # one side only: never paired
            assert await closed_by_relay(r, 3.0)
            await wait_for(lambda: "s5" not in rv)
            assert closed[0].reason.startswith("never paired") and closed[0].pairs == 0
            for port in (pa, pb):
                with pytest.raises(OSError):
                    await asyncio.open_connection(HOST, port)
            w.close()

    run(main)


@pytest.mark.parametrize("mode", MODES)
def test_peer_close_propagates_and_session_ends(mode: str) -> None:
    async def main() -> None:
        closed: list = []
        async with Rendezvous(cfg(mode, unpaired_timeout=0.3),
                              on_session_closed=closed.append) as rv:
            (ra, wa), (rb, wb) = await open_pair(rv, "s6")
            wa.write(b"ping")
            assert await rb.readexactly(4) == b"ping"
            await asyncio.sleep(0.4)  # past the grace period: last pair ending closes it
            wb.write(b"bye")
            wb.close()  # B goes away completely
            assert await ra.readexactly(3) == b"bye"
            assert await closed_by_relay(ra, 3.0)
            wa.close()
            await wait_for(lambda: bool(closed))
            assert closed[0].reason == "last connection closed"
            assert closed[0].bytes_ab == 4 and closed[0].bytes_ba == 3

    run(main)


@pytest.mark.parametrize("mode", MODES)
def test_half_close_keeps_other_direction(mode: str) -> None:
    async def main() -> None:
        async with Rendezvous(cfg(mode)) as rv:
            (ra, wa), (rb, wb) = await open_pair(rv, "s7")
            wa.write(b"request")
            wa.write_eof()
            assert await rb.read() == b"request"  # EOF reached B
            wb.write(b"response after EOF")
            wb.write_eof()
            assert await ra.read() == b"response after EOF"
            wa.close()
            wb.close()

    run(main)


def test_many_concurrent_sessions_one_loop() -> None:
    async def main() -> None:
        n = 200
        async with Rendezvous(cfg()) as rv:
            async def one(i: int) -> None:
                (ra, wa), (rb, wb) = await open_pair(rv, f"m{i}")
                msg = f"session {i}".encode() * 100
                wa.write(msg)
                wb.write(msg[::-1])
                assert await rb.readexactly(len(msg)) == msg
                assert await ra.readexactly(len(msg)) == msg[::-1]
                wa.close()
                wb.close()

            await asyncio.gather(*(one(i) for i in range(n)))
            assert len(rv) == n  # still inside their grace periods
            await wait_for(lambda: rv.stats()["pairs"] == 0)

    run(main, 30)


def test_max_sessions() -> None:
    async def main() -> None:
        async with Rendezvous(RelayConfig(bind_host=HOST, max_sessions=2)) as rv:
            await rv.open_session("x1", None, None)
            await rv.open_session("x2", None, None)
            with pytest.raises(RelayCapacityError):
                await rv.open_session("x3", None, None)
            with pytest.raises(ValueError):
                await rv.open_session("x1", None, None)
            assert rv.close_session("x1")
            await rv.open_session("x3", None, None)

    run(main)


def test_no_auth_sides_relay_bytes_as_is() -> None:
    async def main() -> None:
        async with Rendezvous(cfg()) as rv:
            pa, pb = await rv.open_session("legacy", None, None)
            ra, wa = await connect(pa, None)
            wa.write(b"SSH-2.0-early\r\n")  # sent before the peer even exists
            await asyncio.sleep(0.05)
            rb, wb = await connect(pb, None)
            assert await rb.readexactly(15) == b"SSH-2.0-early\r\n"
            wa.close()
            wb.close()

    run(main)


@pytest.mark.parametrize("mode", MODES)
def test_idle_timeout_closes_pair(mode: str) -> None:
    async def main() -> None:
        c = cfg(mode)
        c = RelayConfig(bind_host=HOST, splice_mode=c.splice_mode, policy=c.policy,
                        idle_timeout=0.4)
        async with Rendezvous(c) as rv:
            (ra, wa), (rb, wb) = await open_pair(rv, "idle")
            wa.write(b"x")
            assert await rb.readexactly(1) == b"x"
            assert await closed_by_relay(ra, 3.0)
            assert await closed_by_relay(rb, 3.0)
            wa.close()
            wb.close()

    run(main)


@pytest.mark.parametrize("mode", MODES)
def test_backpressure_slow_reader_bounds_relay_buffers(mode: str) -> None:
    """A never-reading B must stall A, not grow the relay (userspace bound per direction)."""

    async def main() -> None:
        async with Rendezvous(cfg(mode)) as rv:
            sid = "bp"
            pa, pb = await rv.open_session(sid, hmac_auth(sid, "a"), hmac_auth(sid, "b"))
            rb_sock = socket.create_connection((HOST, pb))
            rb_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            rb_sock.sendall(token(sid, "b") + b"\n")
            ra, wa = await connect(pa, token(sid, "a"))
            chunk = os.urandom(1 << 20)
            sent, peak = 0, 0
            h = hashlib.sha256()
            while sent < (256 << 20):
                wa.write(chunk)
                h.update(chunk)
                sent += len(chunk)
                peak = max(peak, rv.stats()["buffered_bytes"])
                try:
                    await asyncio.wait_for(wa.drain(), 0.5)
                except asyncio.TimeoutError:
                    break  # sender is stalled by backpressure: what we want
            peak = max(peak, rv.stats()["buffered_bytes"])
            print(f"{mode}: sender stalled after {sent >> 20} MiB, relay peak buffered {peak} B")
            assert sent < (256 << 20), "sender never stalled"
            bound = rv.config.high_water + READ_SIZE if mode == "protocol" else 4 << 20
            assert peak <= bound, (peak, bound)
            # now drain B completely: everything arrives intact after resume
            wa.write_eof()
            rb_sock.setblocking(False)
            loop = asyncio.get_running_loop()
            got = hashlib.sha256()
            n = 0
            while True:
                data = await loop.sock_recv(rb_sock, 1 << 20)
                if not data:
                    break
                got.update(data)
                n += len(data)
            assert n == sent and got.digest() == h.digest()
            rb_sock.close()
            wa.close()

    run(main, 30)


def test_idle_session_memory_is_small() -> None:
    """Relay-side Python memory per open, idle session (tracemalloc), target <= 8 KiB."""

    async def main() -> None:
        n = 300
        async with Rendezvous(RelayConfig(bind_host=HOST)) as rv:
            for i in range(10):
                await rv.open_session(f"w{i}", hmac_auth("w", "a"), hmac_auth("w", "b"))
            tracemalloc.start()
            before = tracemalloc.take_snapshot()
            for i in range(n):
                await rv.open_session(f"i{i}", hmac_auth("i", "a"), hmac_auth("i", "b"))
            after = tracemalloc.take_snapshot()
            tracemalloc.stop()
            per = sum(s.size_diff for s in after.compare_to(before, "filename")) / n
            print(f"relay memory per idle session: {per / 1024:.2f} KiB")
            assert per <= 8 * 1024

    run(main)


def test_squatter_flood_beyond_the_budget_cannot_stop_pairing() -> None:
    """Issue 9, beyond the per-port budget: 150 idle sockets on port A and 150 on port B
    (more than max_unauth_per_side=64: the oldest are evicted), and sockets that send
    garbage. The real parties, arriving after them, pair; another session is unaffected;
    the squatters' count stays bounded by the budget."""
    async def main() -> None:
        async with Rendezvous(cfg()) as rv:
            pa, pb = await rv.open_session("s1", hmac_auth("s1", "a"), hmac_auth("s1", "b"))
            squat = []
            for port in (pa, pb):
                for k in range(150):
                    _r, w = await asyncio.open_connection(HOST, port)
                    if k % 10 == 0:
                        w.write(b"\x00garbage without a newline" * 20)
                    elif k % 10 == 1:
                        w.write(b"not a token\n")
                    squat.append(w)
            await wait_for(lambda: rv.stats()["unauthenticated"] <= 2 * 64, 15)
            assert rv.stats()["sessions"] == 1
            (ra, wa), (rb, wb) = await asyncio.gather(connect(pa, token("s1", "a")),
                                                      connect(pb, token("s1", "b")))
            wa.write(b"ping")
            assert await asyncio.wait_for(rb.readexactly(4), 5) == b"ping"
            wb.write(b"pong")
            assert await asyncio.wait_for(ra.readexactly(4), 5) == b"pong"
            (ra2, wa2), (rb2, wb2) = await open_pair(rv, "s2")  # other sessions still served
            wa2.write(b"x")
            assert await asyncio.wait_for(rb2.readexactly(1), 5) == b"x"
            assert rv.stats()["pairs"] == 2
            for w in (*squat, wa, wb, wa2, wb2):
                w.close()

    run(main)


def test_relay_wide_unauthenticated_budget_evicts_oldest() -> None:
    async def main() -> None:
        async with Rendezvous(RelayConfig(bind_host=HOST, max_unauth_total=10,
                                          policy=SessionPolicy(auth_timeout=30.0))) as rv:
            ports = [await rv.open_session(f"s{k}", hmac_auth(f"s{k}", "a"),
                                           hmac_auth(f"s{k}", "b")) for k in range(3)]
            first = [await connect(ports[0][0], None) for _ in range(5)]
            later = [await connect(pa, None) for pa, _pb in ports[1:] for _ in range(5)]
            await wait_for(lambda: rv.stats()["unauthenticated"] == 10, 15)
            # the 5 oldest (all on session s0) were evicted: closed by the relay
            for r, _w in first:
                assert await closed_by_relay(r, 5)
            a, b = await open_pair(rv, "s9")
            a[1].write(b"!")
            assert await asyncio.wait_for(b[0].readexactly(1), 5) == b"!"
            for _r, w in (*first, *later, a, b):
                w.close()

    run(main)
