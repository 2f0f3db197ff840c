"""The client/daemon-side pump (SSHRV) through a real relay: sockets, stdio, transforms."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import subprocess
import sys
import textwrap

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from noports.relay import RelayConfig, Rendezvous, SessionPolicy, connect_relay, run_sshrv
from noports.relay.splice import splice_stdio

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"
KEY, IV = os.urandom(32), os.urandom(16)


def ctr():  # one object per direction, like the official srv (same key+IV both ways)
    return Cipher(algorithms.AES(KEY), modes.CTR(IV))


def relay_cfg() -> RelayConfig:
    return RelayConfig(bind_host=HOST, policy=SessionPolicy(unpaired_timeout=3.0))


def run(coro, timeout: float = 20.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_socket_pumps_with_aes_ctr_end_to_end() -> None:
    """client app <-> pump A <-> relay <-> pump B <-> device app; relay sees ciphertext."""

    async def main() -> None:
        seen: list[bytes] = []

        def auth(expected: bytes):
            def check(line: bytes) -> bool:
                seen.append(line)
                return line == expected
            return check

        async with Rendezvous(relay_cfg()) as rv:
            pa, pb = await rv.open_session("p1", auth(b"A-token"), auth(b"B-token"))
            app_client, pump_client_local = socket.socketpair()
            app_device, pump_device_local = socket.socketpair()
            enc_a, dec_a = ctr().encryptor(), ctr().decryptor()
            enc_b, dec_b = ctr().encryptor(), ctr().decryptor()
            t_client = asyncio.create_task(run_sshrv(
                HOST, pa, "A-token", local=pump_client_local,
                to_relay=enc_a.update, from_relay=dec_a.update))
            t_device = asyncio.create_task(run_sshrv(
                HOST, pb, b"B-token\n", local=pump_device_local,
                to_relay=enc_b.update, from_relay=dec_b.update))
            loop = asyncio.get_running_loop()
            for s in (app_client, app_device):
                s.setblocking(False)
            up, down = os.urandom(8 << 20), os.urandom(3 << 20)

            async def send(sock: socket.socket, data: bytes) -> None:
                await loop.sock_sendall(sock, data)
                sock.shutdown(socket.SHUT_WR)

            async def recv_all(sock: socket.socket) -> bytes:
                buf = bytearray()
                while chunk := await loop.sock_recv(sock, 1 << 20):
                    buf += chunk
                return bytes(buf)

            _, _, got_dev, got_cli = await asyncio.gather(
                send(app_client, up), send(app_device, down),
                recv_all(app_device), recv_all(app_client))
            assert hashlib.sha256(got_dev).digest() == hashlib.sha256(up).digest()
            assert hashlib.sha256(got_cli).digest() == hashlib.sha256(down).digest()
            st_c, st_d = await asyncio.gather(t_client, t_device)
            assert (st_c.bytes_to_relay, st_c.bytes_from_relay) == (len(up), len(down))
            assert (st_d.bytes_to_relay, st_d.bytes_from_relay) == (len(down), len(up))
            assert sorted(seen) == [b"A-token", b"B-token"]  # auth lines stay plaintext
            app_client.close()
            app_device.close()

    run(main())


def test_stdio_pump_with_pipes_and_half_close() -> None:
    async def main() -> None:
        async with Rendezvous(relay_cfg()) as rv:
            pa, pb = await rv.open_session("p2", lambda line: line == b"A", None)
            in_r, in_w = os.pipe()
            out_r, out_w = os.pipe()
            relay_sock = await connect_relay(HOST, pa, "A")
            sp = await splice_stdio(relay_sock, stdin_fd=in_r, stdout_fd=out_w)  # dups the fds
            os.close(in_r)
            os.close(out_w)
            loop = asyncio.get_running_loop()
            dev = socket.create_connection((HOST, pb))
            dev.setblocking(False)
            payload = os.urandom(4 << 20)

            def write_stdin() -> None:
                with open(in_w, "wb") as f:
                    f.write(payload)  # then EOF on close

            def read_stdout() -> bytes:
                with open(out_r, "rb") as f:
                    return f.read()

            w = loop.run_in_executor(None, write_stdin)
            r = loop.run_in_executor(None, read_stdout)
            buf = bytearray()
            while chunk := await loop.sock_recv(dev, 1 << 20):
                buf += chunk
            assert bytes(buf) == payload  # stdin EOF reached the device as EOF
            await w
            await loop.sock_sendall(dev, b"reply after EOF")
            dev.close()
            assert await r == b"reply after EOF"
            await asyncio.wait_for(sp.wait_closed(), 5)
            assert sp.bytes_ab == len(payload) and sp.bytes_ba == 15

    run(main())


def test_stdio_pump_as_subprocess_proxycommand_style() -> None:
    """The pump as its own process on real stdin/stdout pipes, as ssh's ProxyCommand runs it."""

    async def main() -> None:
        async with Rendezvous(relay_cfg()) as rv:
            pa, pb = await rv.open_session("p3", lambda line: line == b"tok", None)
            code = textwrap.dedent(f"""
                import asyncio, sys
                from noports.relay import run_sshrv
                asyncio.run(run_sshrv({HOST!r}, {pa}, "tok"))
            """)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", code, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            dev_r, dev_w = await asyncio.open_connection(HOST, pb)
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(b"SSH-2.0-client\r\n")
            await proc.stdin.drain()
            assert await dev_r.readexactly(16) == b"SSH-2.0-client\r\n"
            dev_w.write(b"SSH-2.0-server\r\n")
            assert await proc.stdout.readexactly(16) == b"SSH-2.0-server\r\n"
            proc.stdin.close()
            assert await dev_r.read() == b""
            dev_w.close()
            assert await proc.stdout.read() == b""
            assert await asyncio.wait_for(proc.wait(), 10) == 0

    run(main(), 30)
