"""The APKAM signing key's public record, which ESCR relays check signatures against.

Its own light module: the daemon publishes the key at start, before (and without) loading the
relay code that sessions need.
"""

from __future__ import annotations

from noports.npproto import escr


async def ensure_signing_key_published(client: object, keys: object) -> str:
    """Publish this enrollment's APKAM public key at ``public:_apsk.<enrollment>.a.__e@me``
    (as the official clients do) unless it is there already; returns its URI.

    ESCR relays verify a connector's signature with the key found there.
    """
    name = escr.apsk_name(keys.enrollment_id)  # type: ignore[attr-defined]
    pub = keys.pkam_public  # type: ignore[attr-defined]
    try:
        current = await client.get_public(name)  # type: ignore[attr-defined]
    except Exception:  # AT0015 (not published yet) or a refused lookup: (re)publish
        current = None
    if (current or "").strip() != pub:
        await client.put_public(name, pub)  # type: ignore[attr-defined]
    return escr.apsk_uri(keys.atsign, keys.enrollment_id)  # type: ignore[attr-defined]
