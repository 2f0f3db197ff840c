"""Device enrollment with one-time codes (APKAM), both sides, over the atProtocol.

Why: giving each device its own key lets an operator onboard a fleet without copying the CRAM
secret or one shared .atKeys file to any device, and revoke one lost device without touching the
others (docs/keys-and-onboarding.md). The flow is the reference's (docs/reference/atprotocol.md#utility-verbs):

* operator (holds the atSign's .atKeys): ``otp:get`` -> a 6-character code, valid <= 1 h, once;
* device: generates its own APKAM key pair and AES key, encrypts the AES key for the atSign's
  public encryption key, sends ``enroll:request`` with the code -> enrollment id (pending). The
  pending state (its private key, 0600) is kept in a file so the device can finish later;
* operator: ``enroll:approve``, sending the atSign's encryption private key and self-encryption
  key encrypted with the device's AES key (so the server never sees them in clear);
* device: ``pkam`` with its enrollment id, ``enroll:fetch`` of its own enrollment, decrypts the
  keys, writes its .atKeys (with ``enrollmentId``) and deletes the pending state.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import ssl
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from noports import crypto
from noports.atclient import AtConnection, AtProtocolError, find_secondary
from noports.atclient.connection import DEFAULT_TIMEOUT
from noports.keys.atkeys import AtKeys, normalise_atsign, save_atkeys

log = logging.getLogger(__name__)

DEFAULT_APP = "noports"
DEFAULT_NAMESPACES = {"sshnp": "rw", "sshrvd": "rw"}
POLL_S = 2.0


class EnrollmentError(RuntimeError):
    """Enrollment did not complete; the message names the step and what to check."""


@dataclass(frozen=True)
class Plane:
    root: tuple[str, int]
    ssl_ctx: ssl.SSLContext | None = None
    timeout: float = DEFAULT_TIMEOUT

    def connect(self, atsign: str) -> AtConnection:
        host, port = find_secondary(self.root[0], int(self.root[1]), atsign, self.ssl_ctx,
                                    timeout=self.timeout)
        return AtConnection(host, port, self.ssl_ctx, timeout=self.timeout)


def _step(what: str, fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except AtProtocolError as exc:
        raise EnrollmentError(f"{what} failed: {exc}") from None


# --- operator side ----------------------------------------------------------------------------

def _operator(plane: Plane, keys: AtKeys) -> AtConnection:
    conn = plane.connect(keys.atsign)
    try:
        _step(f"authenticating as {keys.atsign} with its .atKeys", conn.authenticate_pkam,
              keys.atsign, keys.pkam_private, keys.enrollment_id)
    except BaseException:
        conn.close()
        raise
    return conn


def issue_otp(plane: Plane, keys: AtKeys, ttl_s: int = 3600) -> str:
    """A one-time enrollment code for ``keys.atsign`` (valid ``ttl_s`` <= 3600 s, once)."""
    with _operator(plane, keys) as conn:
        return _step("issuing a one-time code (otp:get)", conn.command,
                     f"otp:get:ttl:{int(ttl_s * 1000)}").strip()


def list_enrollments(plane: Plane, keys: AtKeys, states: list[str] | None = None
                     ) -> list[dict[str, Any]]:
    """Enrollments of the atSign, each with ``enrollmentId`` and ``status``."""
    cmd = "enroll:list"
    if states:
        cmd += ":" + json.dumps({"enrollmentStatusFilter": states}, separators=(",", ":"))
    with _operator(plane, keys) as conn:
        raw = json.loads(_step("listing enrollments", conn.command, cmd))
    out = []
    for key, v in sorted(raw.items()):
        out.append({"enrollmentId": key.split(".", 1)[0], **v})
    return out


def _change(plane: Plane, keys: AtKeys, op: str, eid: str, extra: dict | None = None) -> str:
    params = {"enrollmentId": eid, **(extra or {})}
    with _operator(plane, keys) as conn:
        if op == "approve":
            info = json.loads(_step(f"fetching enrollment {eid}", conn.command,
                                    "enroll:fetch:" + json.dumps({"enrollmentId": eid})))
            enc_sym = info.get("encryptedAPKAMSymmetricKey")
            if not enc_sym:
                raise EnrollmentError(f"enrollment {eid} carries no encrypted APKAM key; it "
                                      "was not made with a one-time code")
            try:
                sym = crypto.rsa_decrypt(keys.encrypt_private, enc_sym)
            except Exception:  # noqa: BLE001 - any failure: the key was not made for us
                raise EnrollmentError(f"enrollment {eid}: its APKAM key is not encrypted for "
                                      f"{keys.atsign}'s public key; deny it") from None
            params["encryptedDefaultEncryptionPrivateKey"] = crypto.aes_encrypt(
                sym, keys.encrypt_private)
            params["encryptedDefaultSelfEncryptionKey"] = crypto.aes_encrypt(
                sym, keys.self_encryption_key)
        reply = json.loads(_step(f"enroll:{op} of {eid}", conn.command,
                                 f"enroll:{op}:" + json.dumps(params, separators=(",", ":"))))
    return str(reply.get("status"))


def approve(plane: Plane, keys: AtKeys, eid: str) -> str:
    return _change(plane, keys, "approve", eid)


def deny(plane: Plane, keys: AtKeys, eid: str) -> str:
    return _change(plane, keys, "deny", eid)


def revoke(plane: Plane, keys: AtKeys, eid: str) -> str:
    return _change(plane, keys, "revoke", eid)


# --- device side ------------------------------------------------------------------------------

def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".enroll-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def request(plane: Plane, atsign: str, otp: str, state_path: Path, *, device: str,
            app: str = DEFAULT_APP, namespaces: dict[str, str] | None = None) -> str:
    """Generate this device's keys and send the enrollment request; returns the id."""
    atsign = normalise_atsign(atsign)
    pub, priv = crypto.generate_rsa_keypair()
    sym = crypto.generate_aes_key()
    with plane.connect(atsign) as conn:
        enc_pub = _step(f"looking up {atsign}'s public encryption key", conn.command,
                        f"lookup:publickey{atsign}").strip()
        params = {"appName": app, "deviceName": device,
                  "namespaces": namespaces or DEFAULT_NAMESPACES, "otp": otp.strip(),
                  "apkamPublicKey": pub,
                  "encryptedAPKAMSymmetricKey": crypto.rsa_encrypt(enc_pub, sym)}
        try:
            reply = json.loads(conn.command("enroll:request:" + json.dumps(
                params, separators=(",", ":"))))
        except AtProtocolError as exc:
            hint = (" (the code is wrong, was used already or expired: ask for a new one)"
                    if "otp" in str(exc).lower() else "")
            raise EnrollmentError(f"{atsign}: enrollment request failed: {exc}{hint}") from None
    eid = reply["enrollmentId"]
    _write_private(state_path, json.dumps({
        "atsign": atsign, "enrollmentId": eid, "apkamPublicKey": pub, "apkamPrivateKey": priv,
        "apkamSymmetricKey": sym, "encryptPublicKey": enc_pub}))
    log.info("%s: enrollment %s requested (%s); waiting for approval", atsign, eid,
             reply.get("status"))
    return str(eid)


def pending_state(state_path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(state_path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise EnrollmentError(f"{state_path}: unreadable enrollment state: {exc}") from None


def complete(plane: Plane, state_path: Path, keys_path: Path, *, wait_s: float = 0.0,
             sleep: Callable[[float], None] = time.sleep) -> AtKeys | None:
    """Finish a pending enrollment: None while it is still pending after ``wait_s``."""
    st = pending_state(state_path)
    if st is None:
        raise EnrollmentError(f"{state_path}: no pending enrollment (run the request first)")
    atsign, eid = st["atsign"], st["enrollmentId"]
    deadline = time.monotonic() + wait_s
    while True:
        conn = plane.connect(atsign)
        try:
            try:
                conn.authenticate_pkam(atsign, st["apkamPrivateKey"], eid)
            except AtProtocolError as exc:
                if exc.code != "AT0026":  # pending
                    what = {"AT0025": "was denied", "AT0027": "was revoked",
                            "AT0028": "expired or is unknown"}.get(exc.code, f"failed: {exc}")
                    raise EnrollmentError(f"{atsign}: enrollment {eid} {what}; ask the "
                                          "operator for a new code") from None
                if time.monotonic() >= deadline:
                    return None
                sleep(POLL_S)
                continue
            info = json.loads(_step("fetching the approved enrollment", conn.command,
                                    "enroll:fetch:" + json.dumps({"enrollmentId": eid})))
        finally:
            conn.close()
        break
    sym = st["apkamSymmetricKey"]
    try:
        enc_priv = crypto.aes_decrypt(sym, info["encryptedDefaultEncryptionPrivateKey"])
        self_key = crypto.aes_decrypt(sym, info["encryptedDefaultSelfEncryptionKey"])
    except (KeyError, crypto.CryptoError) as exc:
        raise EnrollmentError(f"{atsign}: enrollment {eid} was approved without usable keys "
                              f"({type(exc).__name__}); ask the operator to approve it with "
                              "`noports enroll approve`") from None
    keys = AtKeys(atsign=atsign, pkam_public=st["apkamPublicKey"],
                  pkam_private=st["apkamPrivateKey"], encrypt_public=st["encryptPublicKey"],
                  encrypt_private=enc_priv, self_encryption_key=self_key,
                  apkam_symmetric_key=sym, enrollment_id=eid)
    save_atkeys(keys, keys_path)
    state_path.unlink(missing_ok=True)
    log.info("%s: enrollment %s approved; keys written to %s", atsign, eid, keys_path)
    return keys
