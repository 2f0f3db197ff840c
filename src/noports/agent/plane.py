"""One control-plane session per client atSign, shared by every tunnel the agent sets up.

Why: today each ``sshnp --stdio`` logs in twice (command + monitor connection), fetches the
keys it needs and exits with its master; the agent keeps one
:class:`~noports.atclient.mux.MuxClient` per client atSign: ONE atServer connection and one
PKAM login carry its commands and its monitor (decision 0031; a cut connection is opened
again with one login and the monitor resumes from the last notification it saw). It hands
:func:`noports.client.flow.open_session` a :class:`SharedClient`: the same interface, but
``monitor()`` returns a subscription to one shared monitor (the flow's router drops what is
not for its session) and ``close()`` leaves the session open.

Caches have a bounded lifetime (``cache_ttl``): public keys and the device's shared username
are reused for that long, and a signature that does not verify drops the cached public key at
once (the flow retries with a fresh one, ``flow.verify_response``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

log = logging.getLogger(__name__)

#: what every NoPorts client session listens for (relay answers, device answers, pings)
MONITOR_REGEX = r"\.sshrvd@|\.sshnp@"
MONITOR_REPLAY_SLACK_MS = 2_000
SUB_QUEUE = 1024
DEFAULT_CACHE_TTL_S = 300.0


class _TtlDict(dict):  # type: ignore[type-arg]
    """``flow.device_pk(fresh=True)`` pops ``client._public_keys[atsign]``: that pop must
    reach the shared cache."""


class _Subscription:
    """What ``SharedClient.monitor()`` returns: the shared monitor's notifications, for one
    flow; it unsubscribes itself when the flow's router task is cancelled."""

    def __init__(self, hub: _Hub) -> None:
        self.hub = hub
        self.queue: asyncio.Queue[Any] = asyncio.Queue(SUB_QUEUE)

    def start(self) -> _Subscription:
        self.hub.subscribe(self)
        return self

    def __aiter__(self) -> _Subscription:
        return self

    async def __anext__(self) -> Any:
        try:
            item = await self.queue.get()
        except BaseException:
            self.hub.subs.discard(self)
            raise
        if isinstance(item, BaseException):
            self.hub.subs.discard(self)
            raise item
        return item

    async def aclose(self) -> None:
        self.hub.subs.discard(self)


class _Hub:
    """Fans one monitor out to every live subscription."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.subs: set[_Subscription] = set()
        self.monitor: Any = None
        self.task: asyncio.Task[None] | None = None
        self.failed: BaseException | None = None

    def subscribe(self, sub: _Subscription) -> None:
        if self.failed is not None:
            sub.queue.put_nowait(self.failed)
            return
        self.subs.add(sub)
        if self.task is None:
            self.monitor = self.client.monitor(MONITOR_REGEX, since_ms=int(
                time.time() * 1000) - MONITOR_REPLAY_SLACK_MS)
            self.monitor.start()
            self.task = asyncio.get_running_loop().create_task(self.run())

    async def run(self) -> None:
        try:
            async for n in self.monitor:
                for sub in list(self.subs):
                    try:
                        sub.queue.put_nowait(n)
                    except asyncio.QueueFull:  # a flow that stopped reading: drop it
                        log.warning("dropping a stalled session's notification queue")
                        self.subs.discard(sub)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the monitor could not start: every waiter must hear it
            self.failed = exc
            for sub in list(self.subs):
                with contextlib.suppress(asyncio.QueueFull):
                    sub.queue.put_nowait(exc)
            self.subs.clear()

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task
        if self.monitor is not None:
            await self.monitor.aclose()


class SharedClient:
    """An AtClient shared by many concurrent flows (see the module docstring)."""

    def __init__(self, client: Any, cache_ttl: float = DEFAULT_CACHE_TTL_S) -> None:
        self.client = client
        self.keys = client.keys
        self.cache_ttl = cache_ttl
        self.hub = _Hub(client)
        self._public_keys = _TtlDict()  # atsign -> (value, fetched at)
        self._shared: dict[tuple[str, str, str | None], tuple[str | None, float]] = {}
        self.sessions = 0

    @property
    def broken(self) -> bool:
        """The monitor failed at start (bad keys, unknown atSign): make a new one next time."""
        return self.hub.failed is not None

    def monitor(self, regex: str | None = None, since_ms: int | None = None) -> _Subscription:
        return _Subscription(self.hub)

    async def notify(self, *args: Any, **kw: Any) -> str:
        return await self.client.notify(*args, **kw)

    async def shared_key_by_other(self, other: str, *, refresh: bool = False) -> str:
        return await self.client.shared_key_by_other(other, refresh=refresh)

    async def public_key(self, atsign: str) -> str:
        hit = self._public_keys.get(atsign)
        if hit is not None and time.monotonic() - hit[1] < self.cache_ttl:
            return hit[0]
        self.client._public_keys.pop(atsign, None)  # the AtClient's own cache never expires
        value = await self.client.public_key(atsign)
        self._public_keys[atsign] = (value, time.monotonic())
        return value

    async def get_shared(self, name: str, *, shared_by: str, shared_with: str | None = None,
                         namespace: str | None = None) -> str | None:
        key = (name, shared_by, namespace)
        hit = self._shared.get(key)
        if hit is not None and time.monotonic() - hit[1] < self.cache_ttl:
            return hit[0]
        value = await self.client.get_shared(name, shared_by=shared_by,
                                             shared_with=shared_with, namespace=namespace)
        self._shared[key] = (value, time.monotonic())
        return value

    async def close(self) -> None:
        """What ``open_session`` calls when it is done: the session stays open for the next."""

    async def aclose(self) -> None:
        await self.hub.close()
        await self.client.close()


class PlanePool:
    """SharedClients by (client atSign, keys file, root, CA file)."""

    def __init__(self, cache_ttl: float = DEFAULT_CACHE_TTL_S) -> None:
        self.cache_ttl = cache_ttl
        self.clients: dict[tuple[Any, ...], SharedClient] = {}

    @property
    def logins(self) -> int:
        """PKAM logins made by the live sessions (1 each, plus one per reconnect)."""
        return sum(getattr(s.client, "logins", 0) for s in self.clients.values())

    def get(self, params: Any) -> SharedClient:
        from noports.atclient.mux import MuxClient
        from noports.client.flow import client_ssl_context, load_client_keys
        key = (params.client_atsign, str(params.keys_path), params.root,
               str(params.ca_file) if params.ca_file else None)
        shared = self.clients.get(key)
        if shared is not None and not shared.broken:
            return shared
        if shared is not None:
            self.clients.pop(key, None)
            asyncio.get_running_loop().create_task(shared.aclose())
        keys = load_client_keys(params)
        client = MuxClient(params.client_atsign, keys, params.root, client_ssl_context(params),
                           timeout=params.connect_timeout)
        shared = self.clients[key] = SharedClient(client, self.cache_ttl)
        return shared

    async def aclose(self) -> None:
        for shared in list(self.clients.values()):
            with contextlib.suppress(Exception):
                await shared.aclose()
        self.clients.clear()
