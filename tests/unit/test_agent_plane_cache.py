"""The agent's shared caches (noports.agent.plane.SharedClient): bounded in time, and a
public key is fetched again at once when the flow's signature check asks for a fresh one
(``flow._Flow.device_pk(fresh=True)``, what ``verify_response`` calls on a bad signature).

The AtClient under it is a recorder of look-ups (this tests cache logic, no wire)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace

from noports.agent.plane import SharedClient
from noports.client.flow import _Flow


class Lookups:
    """What SharedClient needs of an AtClient: counted look-ups with changing answers."""

    def __init__(self) -> None:
        self.keys = object()
        self._public_keys: dict[str, str] = {}
        self.pk_fetches = 0
        self.shared_fetches = 0

    async def public_key(self, atsign: str) -> str:
        self.pk_fetches += 1
        cached = self._public_keys.get(atsign)
        if cached:
            return cached
        self._public_keys[atsign] = f"key{self.pk_fetches}"
        return self._public_keys[atsign]

    async def get_shared(self, name: str, **kw: object) -> str:
        self.shared_fetches += 1
        return f"user{self.shared_fetches}"


def _flow(client: SharedClient, tmp_path: Path) -> _Flow:
    flow = _Flow.__new__(_Flow)
    flow.client = client
    flow.p = SimpleNamespace(device_atsign="@dev", home_cache=tmp_path)
    return flow


def test_signature_mismatch_refetches_the_public_key_at_once(tmp_path: Path) -> None:
    inner = Lookups()
    shared = SharedClient(inner, cache_ttl=300)
    flow = _flow(shared, tmp_path)

    async def main() -> None:
        assert await shared.public_key("@dev") == "key1"
        assert await shared.public_key("@dev") == "key1" and inner.pk_fetches == 1  # cached
        # a response whose signature does not verify: the flow asks for a fresh key
        assert await flow.device_pk(fresh=True) == "key2"
        assert inner.pk_fetches == 2
        assert await shared.public_key("@dev") == "key2" and inner.pk_fetches == 2

    asyncio.run(main())


def test_public_key_and_username_expire_after_cache_ttl() -> None:
    inner = Lookups()
    shared = SharedClient(inner, cache_ttl=0.2)

    async def main() -> None:
        assert await shared.public_key("@dev") == "key1"
        assert await shared.get_shared("username.d", shared_by="@dev",
                                       namespace="sshnp") == "user1"
        assert await shared.get_shared("username.d", shared_by="@dev",
                                       namespace="sshnp") == "user1"
        time.sleep(0.25)
        assert await shared.public_key("@dev") == "key2"  # the AtClient's own cache dropped
        assert await shared.get_shared("username.d", shared_by="@dev",
                                       namespace="sshnp") == "user2"
        assert (inner.pk_fetches, inner.shared_fetches) == (2, 2)

    asyncio.run(main())
