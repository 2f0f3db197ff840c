"""A 10-minute firewall cut: sshnpd is back within 5 s after the path returns (issue 12, 4).

Alone in its file, with its own world (namespaces, plane, srvd, one daemon) so it runs in
parallel with everything else (pytest-xdist ``--dist loadfile``) and shares nothing with
other files; marked ``long`` (about 11 minutes of wall time, almost all of it waiting:
``-m "not long"`` leaves it out). The cut is nftables drop in the device's namespace, both
directions, no RST and no FIN: only the daemon's own heartbeat can notice it. During the cut
every reconnect fails at once; the back-off is capped (4 s, jitter x0.5-1), so the next
attempt after the cut ends comes within the cap.

What is asserted is the issue's requirement: the monitor is started again within 5 s of the
cut being lifted (hang bounds elsewhere are generous). Measured from the test's side: the
time from ``nft delete table`` to the daemon's "monitor started" line, then a real ping
round trip to show it serves.
"""

from __future__ import annotations

import pytest

from tests.harness.liveness import daemon_world, firewall_cut, ping_until_answered, run
from tests.harness.topology import is_root

CUT_S = 600.0
BACK_WITHIN_S = 5.0  # issue 12, point 4: device back in <= 5 s

pytestmark = [
    pytest.mark.integration,
    pytest.mark.long,
    pytest.mark.timeout(CUT_S + 300),
    pytest.mark.skipif(not is_root(), reason="the firewall cut needs root (netns + nftables)"),
]


def test_back_within_5s_after_10min_firewall_cut(tmp_path):
    with daemon_world(tmp_path) as w:
        run(ping_until_answered(w, 30))  # serving before the cut
        back, lines = firewall_cut(w, CUT_S)
        took = run(ping_until_answered(w))
        print(f"\n[liveness] 10 min nftables cut: monitor back {back:.1f}s after the cut "
              f"was lifted, a ping answered {took:.1f}s after that")
        assert any("AtTimeoutError" in ln for ln in lines)  # the heartbeat noticed
        assert w.daemons[1].popen.poll() is None
        assert back <= BACK_WITHIN_S, (
            f"sshnpd's monitor came back {back:.1f}s after a 10-minute cut was lifted "
            f"(requirement: <= {BACK_WITHIN_S:g}s)\n" + "\n".join(lines[-30:]))
