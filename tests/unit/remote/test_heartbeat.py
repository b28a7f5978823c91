"""The flow's half of the dead-man switch, renewing through a real (local) shell."""

from __future__ import annotations

import time
from pathlib import Path

from llmflow.remote import heartbeat
from llmflow.remote.connections import close_run


def test_renew_every_gives_five_chances_per_ttl_and_at_most_a_minute():
    assert heartbeat.renew_every(10) == 2
    assert heartbeat.renew_every(600) == 60
    assert heartbeat.renew_every(3600) == 60
    assert heartbeat.renew_every(1) == 0.5


def test_a_run_is_renewed_from_start_to_stop(tmp_path: Path):
    beat = tmp_path / "heartbeat"
    heartbeat.start("hb-test", None, str(tmp_path), ttl_s=2.5)  # renewed every 0.5 s
    try:
        assert beat.exists(), "the first renewal happens at start"
        seen = {beat.read_text()}
        deadline = time.monotonic() + 3
        while len(seen) < 3 and time.monotonic() < deadline:
            seen.add(beat.read_text())
            time.sleep(0.05)
        assert len(seen) >= 3, "the file did not keep changing"
        assert "hb-test" in heartbeat.running()
    finally:
        heartbeat.stop("hb-test")
        close_run("hb-test")
    last = beat.read_text()
    time.sleep(1.2)
    assert beat.read_text() == last, "renewed after stop"
    assert "hb-test" not in heartbeat.running()
    assert not (tmp_path / "heartbeat.tmp").exists()
