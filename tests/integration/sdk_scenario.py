"""Drives the real, unmodified `at_client` SDK (PyPI atsdk) against our plane.

Run as a separate process (the SDK keeps a process-wide root connection singleton):
    python sdk_scenario.py ROOT_HOST ROOT_PORT @sender @recipient
with HOME holding ~/.atsign/keys/<atSign>_key.atKeys for both atSigns and SSL_CERT_FILE set to
the plane CA. Prints one JSON object with what was observed; the test asserts on it.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
import uuid

from at_client import AtClient
from at_client.common import AtSign
from at_client.common.keys import PublicKey, SelfKey, SharedKey
from at_client.connections.address import Address
from at_client.connections.notification.atevents import AtEventType


def main() -> None:
    host, port, sender_name, recipient_name = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    root = Address(host, port)
    sender, recipient = AtSign(sender_name), AtSign(recipient_name)
    out: dict[str, object] = {}

    alice = AtClient(sender, root_address=root)          # PKAM happens in the constructor
    out["pkam"] = alice.is_authenticated()

    # public, self and shared keys: put then get back
    tag = uuid.uuid4().hex[:8]
    pub = PublicKey(f"location{tag}", sender)
    alice.put(pub, "public value")
    out["public"] = alice.get(PublicKey(f"location{tag}", sender))
    selfk = SelfKey(f"secret{tag}", sender)
    alice.put(selfk, "self value")
    out["self"] = alice.get(SelfKey(f"secret{tag}", sender))
    shared = SharedKey(f"shared{tag}", sender, recipient)
    alice.put(shared, "shared value")
    out["shared_by_me"] = alice.get(SharedKey(f"shared{tag}", sender, recipient))

    q: queue.Queue = queue.Queue()
    bob = AtClient(recipient, root_address=root, queue=q)
    out["shared_by_other"] = bob.get(SharedKey(f"shared{tag}", sender, recipient))
    out["public_remote"] = bob.get(PublicKey(f"location{tag}", sender))
    threading.Thread(target=bob.start_monitor, daemon=True).start()
    time.sleep(1.0)  # let the monitor connection authenticate and subscribe

    message = f"hello from {sender_name} {tag}"
    nkey = SharedKey(f"message{tag}", sender, recipient)
    nkey.set_namespace("noports")
    out["notify_id"] = alice.notify(nkey, message)

    deadline = time.time() + 30
    received = None
    events: list[str] = []
    while time.time() < deadline and received is None:
        try:
            ev = q.get(timeout=0.5)
        except queue.Empty:
            continue
        events.append(ev.event_type.name)
        if ev.event_type == AtEventType.UPDATE_NOTIFICATION:
            bob.handle_event(q, ev)   # decrypts and re-queues as DECRYPTED_UPDATE_NOTIFICATION
        elif ev.event_type == AtEventType.DECRYPTED_UPDATE_NOTIFICATION:
            events.append(ev.event_data.get("key", ""))
            if f"message{tag}" in ev.event_data.get("key", ""):
                received = ev.event_data
    out["events"] = events
    out["received_key"] = received and received.get("key")
    out["received_from"] = received and received.get("from")
    out["decrypted"] = received and received.get("decryptedValue")
    out["expected"] = message
    print(json.dumps(out))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
