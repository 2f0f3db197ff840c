"""`noports enroll ...`: one-time codes, device enrollment, listing, approval and revocation.

Why a module of its own: the `noports` admin tool (admin.py) manages a plane from its host; these
commands talk to any plane over the network with an operator's .atKeys (otp/list/approve/deny/
revoke) or, on a device, with nothing but a one-time code (request). Output is one line per
fact, or JSON with --json (for Ansible); expected failures raise EnrollmentError (exit 2).
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
from pathlib import Path
from typing import Any

from noports.keys import enroll as EN
from noports.keys.atkeys import default_keys_dir, keys_file_name, load_atkeys, normalise_atsign

EnrollmentError = EN.EnrollmentError


def _hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def _ttl(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) <= 3600:
        raise argparse.ArgumentTypeError(f"a code lives 1..3600 s, got {text!r}")
    return int(text)


def add_parser(top: Any, add_common: Any) -> None:
    enroll = top.add_parser(
        "enroll", help="one-time codes and per-device keys (APKAM enrollment)",
        description="Give each device its own key with a one-time code instead of the "
                    "atSign's CRAM secret; list, approve, deny and revoke device keys.")
    sub = enroll.add_subparsers(dest="command",
                                metavar="{otp,request,list,approve,deny,revoke}")
    sub.required = True

    def common(p: argparse.ArgumentParser, operator: bool) -> None:
        p.add_argument("atsign", metavar="@ATSIGN")
        p.add_argument("--root", type=_hostport, required=True, metavar="HOST:PORT",
                       help="the plane's atDirectory")
        p.add_argument("--ca", type=Path, default=None, metavar="FILE",
                       help="CA certificate to trust (default: $SSL_CERT_FILE / system store)")
        if operator:
            p.add_argument("--keys", type=Path, default=None, metavar="FILE.atKeys",
                           help="the operator's .atKeys for the atSign (default: "
                                "~/.atsign/keys/<atsign>_key.atKeys)")
        p.add_argument("--timeout", type=float, default=30.0, metavar="S",
                       help="seconds to wait for each reply (default: 30)")
        p.add_argument("--json", action="store_true", help="print JSON")
        add_common(p, argparse.SUPPRESS)

    p = sub.add_parser("otp", help="issue a one-time enrollment code (operator)",
                       description="Issue a one-time code a device uses once, within --ttl, "
                                   "to ask for its own key. Prints only the code.")
    common(p, True)
    p.add_argument("--ttl", type=_ttl, default=3600, metavar="S",
                   help="seconds the code is valid, at most 3600 (default: 3600)")

    p = sub.add_parser(
        "request", help="enroll this device with a one-time code (device)",
        description="Generate this device's keys here, ask for enrollment with a one-time "
                    "code, and (with --wait) write its .atKeys once an operator approves. "
                    "Re-running with the same --state-file resumes a pending enrollment.")
    common(p, False)
    p.add_argument("--otp-file", type=Path, default=None, metavar="FILE",
                   help="file holding the one-time code ('-' = stdin); not needed to resume")
    p.add_argument("--device", required=True, metavar="NAME",
                   help="this device's name (shown to the approving operator)")
    p.add_argument("--app", default=EN.DEFAULT_APP, metavar="NAME",
                   help=f"application name (default: {EN.DEFAULT_APP})")
    p.add_argument("--keys-dir", type=Path, default=None, metavar="DIR",
                   help="where the .atKeys file goes (default: ~/.atsign/keys)")
    p.add_argument("--state-file", type=Path, default=None, metavar="FILE",
                   help="pending enrollment state, 0600 (default: <keys-dir>/<atsign>"
                        ".enrollment.json)")
    p.add_argument("--wait", type=float, default=0.0, metavar="S",
                   help="seconds to wait for approval (default: 0 = just send the request)")

    p = sub.add_parser("list", help="list the atSign's enrollments (operator)")
    common(p, True)
    p.add_argument("--status", action="append", default=None,
                   choices=["pending", "approved", "denied", "revoked"],
                   help="only these states (repeatable)")

    for op, text in (("approve", "approve a pending enrollment, sending it the atSign's "
                                 "encryption keys encrypted for that device only"),
                     ("deny", "deny a pending enrollment"),
                     ("revoke", "revoke a device's key: its authentication is refused, its "
                                "connections close and relays end its sessions")):
        p = sub.add_parser(op, help=f"{text} (operator)", description=text[0].upper()
                           + text[1:] + ".")
        common(p, True)
        p.add_argument("enrollment_id", metavar="ENROLLMENT_ID")


def _plane(args: argparse.Namespace) -> EN.Plane:
    from noports.keys.ca import client_context

    try:
        ctx = client_context(args.ca.expanduser() if args.ca else None)
    except (OSError, ssl.SSLError) as exc:
        raise EnrollmentError(f"cannot load CA certificate {args.ca}: {exc}") from None
    return EN.Plane(args.root, ctx, args.timeout)


def _operator_keys(args: argparse.Namespace):  # noqa: ANN202
    atsign = normalise_atsign(args.atsign)
    path = args.keys or default_keys_dir().expanduser() / keys_file_name(atsign)
    return load_atkeys(path, atsign=atsign)


def _print(args: argparse.Namespace, obj: Any, text: str) -> None:
    print(json.dumps(obj) if args.json else text, flush=True)


def cmd_otp(args: argparse.Namespace) -> int:
    code = EN.issue_otp(_plane(args), _operator_keys(args), args.ttl)
    _print(args, {"otp": code, "ttl": args.ttl}, code)
    return 0


def cmd_request(args: argparse.Namespace) -> int:
    atsign = normalise_atsign(args.atsign)
    keys_dir = (args.keys_dir or default_keys_dir()).expanduser()
    state = args.state_file or keys_dir / f"{atsign}.enrollment.json"
    keys_path = keys_dir / keys_file_name(atsign)
    plane = _plane(args)
    st = EN.pending_state(state)
    if st is None:
        if args.otp_file is None:
            raise EnrollmentError("no pending enrollment: give the one-time code with "
                                  "--otp-file FILE (or - for stdin)")
        try:
            text = (sys.stdin.read() if str(args.otp_file) == "-"
                    else args.otp_file.expanduser().read_text("utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise EnrollmentError(f"cannot read the one-time code: {exc}") from None
        if not text.strip() or any(c.isspace() for c in text.strip()):
            raise EnrollmentError("the one-time code file must hold one code (no spaces)")
        eid = EN.request(plane, atsign, text, state, device=args.device, app=args.app)
    else:
        eid = st["enrollmentId"]
    keys = EN.complete(plane, state, keys_path, wait_s=args.wait)
    if keys is None:
        _print(args, {"enrollmentId": eid, "status": "pending", "state_file": str(state)},
               f"enrollment {eid} is pending approval (state in {state})")
        return 0
    _print(args, {"enrollmentId": eid, "status": "approved", "keys_file": str(keys_path)},
           f"enrollment {eid} approved; keys written to {keys_path} (mode 0600)")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    rows = EN.list_enrollments(_plane(args), _operator_keys(args), args.status)
    text = "\n".join(f"{r['enrollmentId']}  {r.get('status', '?'):9} {r.get('appName', '?')}/"
                     f"{r.get('deviceName', '?')}" for r in rows) or "no enrollments"
    _print(args, rows, text)
    return 0


def _change(op: str):  # noqa: ANN202
    def run(args: argparse.Namespace) -> int:
        status = getattr(EN, op)(_plane(args), _operator_keys(args), args.enrollment_id)
        _print(args, {"enrollmentId": args.enrollment_id, "status": status},
               f"enrollment {args.enrollment_id}: {status}")
        return 0
    return run


COMMANDS = {("enroll", "otp"): cmd_otp, ("enroll", "request"): cmd_request,
            ("enroll", "list"): cmd_list, ("enroll", "approve"): _change("approve"),
            ("enroll", "deny"): _change("deny"), ("enroll", "revoke"): _change("revoke")}
