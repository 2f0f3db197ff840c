"""`make demo`: the embedded control plane, end to end, in a throw-away directory.

Runs the same commands a user would (`noports plane init`, `noports plane up`,
`noports atsign create`), then has the official Python SDK (`at_client`) send an end-to-end
encrypted notification from @alice to @bob and receive and decrypt it on @bob's monitor.
Progress goes to stderr; everything is cleaned up at the end, also on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import io
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def step(n: int, text: str) -> None:
    print(f"[{n}/5] {text}", file=sys.stderr, flush=True)


def noports(*args: str) -> None:
    exe = BIN / "noports"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "noports.admin"]
    res = subprocess.run([*cmd, "-q", *args], capture_output=True, text=True, timeout=120,
                         check=False)
    if res.returncode != 0:
        raise SystemExit(f"demo: `noports {' '.join(args)}` failed:\n{res.stderr.strip()}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_plane_up(proc: subprocess.Popen, plane: Path, timeout: float = 30) -> None:
    exe = BIN / "noports"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"demo: `noports plane up` exited with {proc.returncode}")
        ok = subprocess.run([str(exe), "-q", "plane", "status", "--dir", str(plane)],
                            capture_output=True, timeout=30, check=False).returncode == 0
        if ok:
            return
        time.sleep(0.3)
    raise SystemExit("demo: the plane did not come up in time")


def send_and_receive(root: tuple[str, int], message: str) -> dict:
    """The official SDK: @alice notifies @bob; @bob's monitor receives and decrypts."""
    from at_client import AtClient
    from at_client.common import AtSign
    from at_client.common.keys import SharedKey
    from at_client.connections.address import Address
    from at_client.connections.notification.atevents import AtEventType

    address = Address(*root)
    q: queue.Queue = queue.Queue()
    sdk_chatter = io.StringIO()
    with contextlib.redirect_stdout(sdk_chatter):
        alice = AtClient(AtSign("@alice"), root_address=address)
        bob = AtClient(AtSign("@bob"), root_address=address, queue=q)
        threading.Thread(target=bob.start_monitor, daemon=True).start()
        time.sleep(1.0)
        key = SharedKey("greeting", AtSign("@alice"), AtSign("@bob"))
        key.set_namespace("demo")
        alice.notify(key, message)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                ev = q.get(timeout=0.5)
            except queue.Empty:
                continue
            if ev.event_type == AtEventType.UPDATE_NOTIFICATION:
                bob.handle_event(q, ev)
            elif (ev.event_type == AtEventType.DECRYPTED_UPDATE_NOTIFICATION
                  and "greeting" in ev.event_data.get("key", "")):
                return ev.event_data
    raise SystemExit("demo: @bob did not receive the notification within 20 s")


def main() -> None:
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="noports-demo-"))
    plane = work / "plane"
    home = work / "home"
    keys_dir = home / ".atsign" / "keys"
    up: subprocess.Popen | None = None

    def cleanup(*_: object) -> None:
        if up is not None and up.poll() is None:
            up.send_signal(signal.SIGTERM)
            try:
                up.wait(15)
            except subprocess.TimeoutExpired:
                up.kill()
        shutil.rmtree(work, ignore_errors=True)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    try:
        port = free_port()
        step(1, f"creating a self-hosted plane in {plane} (its own CA, directory on :{port})")
        noports("plane", "init", "--dir", str(plane), "--host", "127.0.0.1",
                "--directory-port", str(port))
        step(2, "starting the atDirectory and the atServer (noports plane up)")
        up = subprocess.Popen([str(BIN / "noports"), "-q", "plane", "up", "--dir", str(plane)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
        wait_plane_up(up, plane)
        step(3, "creating and activating @alice and @bob (CRAM, then PKAM; .atKeys mode 0600)")
        for atsign in ("@alice", "@bob"):
            noports("atsign", "create", atsign, "--dir", str(plane), "--keys-dir", str(keys_dir))
        # the official SDK finds keys in ~/.atsign/keys and trusts the plane's CA
        os.environ["HOME"] = str(home)
        os.environ["SSL_CERT_FILE"] = str(plane / "tls" / "ca.pem")
        message = f"hello @bob, it is {time.strftime('%H:%M:%S')} at @alice"
        step(4, "@alice -> @bob: end-to-end encrypted notification via the official at_client SDK")
        got = send_and_receive(("127.0.0.1", port), message)
        step(5, "@bob's monitor received it and decrypted it with the shared key")
        print(f"\n  key:       {got['key']}\n  from:      {got['from']}\n"
              f"  encrypted: {str(got.get('value'))[:44]}...\n"
              f"  decrypted: {got['decryptedValue']}")
        ok = got["decryptedValue"] == message
        print(f"\ndemo {'OK' if ok else 'FAILED'}: 2 atSigns created, 1 notification sent and "
              f"decrypted, {time.monotonic() - started:.1f} s")
        if not ok:
            raise SystemExit(1)
    except KeyboardInterrupt:
        print("demo: interrupted, cleaning up", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        cleanup()


if __name__ == "__main__":
    main()
