"""Random commands into the session handler: never an unexpected exception, always framed."""

from __future__ import annotations

import asyncio
import logging
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from noports import crypto
from noports.atserver.host import Host, ServerConfig
from noports.atserver.session import Session
from noports.atserver.store import Store
from noports.atserver.wire import RemoteReply

SECRET = "fuzzsecret"

_TMP = tempfile.TemporaryDirectory()
_STORE = Store(Path(_TMP.name) / "atserver.db")
_STORE.add_hosted("@alice", 0, SECRET)


class _Remote:
    async def request(self, me, other, line, *, handshake, timeout=10.0):
        if "publickey" in line:
            return RemoteReply(data='{"key":"public:publickey@bob","data":"x","metaData":{}}')
        if "weird" in line:
            return RemoteReply(data="not json")
        return RemoteReply(code="AT0015", message="nope")

    async def verify_pol(self, me, from_atsign, cookie, proof):
        return "good" in from_atsign


async def _nosleep(_s: float) -> None:
    return None


_HOST = Host("@alice", _STORE, ServerConfig(), remote=_Remote(), sleep=_nosleep)
_HOST.ensure_startup_keys()


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


VERBS = ["from:", "cram:", "pkam:", "pol", "update:", "update:meta:", "update:json:", "llookup:",
         "plookup:", "lookup:", "scan", "scan:", "delete:", "stats", "stats:", "config:",
         "monitor", "monitor:", "notify:", "notify:list", "notify:status:", "notify:remove:",
         "notify:fetch:", "notify:all:", "sync:from:", "batch:", "info", "info:", "noop:",
         "enroll:", "otp:", "keys:", "@exit", ""]
PIECES = ["@alice", "@bob", "@good", "public:", "cached:", "@bob:", "ttl:10:", "ttr:-1:",
          "ttb:5:", "ccd:true:", "isEncrypted:true:", "ivNonce:AAAA:", "id:x1:", "update:",
          "delete:", "messageType:text:", "phone", "phone.wavi", "shared_key", "publickey",
          "weird", "privatekey:at_secret", "privatekey:at_pkam_publickey", " value", ":",
          "0", "1", "-2", "999999999999999999999", ".*", "[", "(", "*", "\u00e9", "\U0001F6E0",
          '{"version":"3.0.57"}', "clientConfig:", "showhidden:true", "selfNotifications:",
          "strategy:latest:", "notifier:n:", "ttln:100:", "page:1", "bypassCache:true:",
          "all:", "meta:", "[{\"id\":1,\"command\":\"noop:0\"}]", "limit:2"]

line_text = st.text(alphabet=st.characters(blacklist_characters="\n\r",
                                           blacklist_categories=("Cs",)), max_size=40)
command = st.one_of(
    line_text,
    st.builds(lambda v, parts: v + "".join(parts), st.sampled_from(VERBS),
              st.lists(st.one_of(st.sampled_from(PIECES), line_text), max_size=6)),
)
auth_state = st.sampled_from(["none", "owner", "pol"])


async def _session(state: str) -> Session:
    s = Session(_HOST, emit=lambda _line: None)
    if state == "owner":
        ch = (await s.handle("from:@alice")).text.split("\n")[0][5:]
        await s.handle("cram:" + crypto.cram_digest(SECRET, ch))
        assert s.authenticated
    elif state == "pol":
        await s.handle("from:@good")
        await s.handle("pol")
        assert s.pol_atsign == "@good"
    return s


@settings(max_examples=1500, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(state=auth_state, cmds=st.lists(command, min_size=1, max_size=6))
def test_random_commands_never_crash_the_session(state, cmds):
    errors = _Errors()
    logger = logging.getLogger("noports.atserver")
    logger.addHandler(errors)
    try:
        async def go() -> None:
            s = await _session(state)
            for c in cmds:
                r = await s.handle(c)
                if r.text is None:
                    assert r.close or s.monitoring
                else:
                    assert "\n" in r.text
                    body, prompt = r.text.rsplit("\n", 1)
                    assert body.startswith(("data:", "error:")), (c, r.text[:200])
                    assert prompt in ("", "@", "@alice@", "@good@"), (c, prompt)
                if r.close:
                    break
            s.close()

        asyncio.run(go())
    finally:
        logger.removeHandler(errors)
    assert not errors.records, [rec.getMessage() for rec in errors.records]
