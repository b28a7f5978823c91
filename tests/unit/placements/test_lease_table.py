"""`llmflow cleanup --list` prints a table a person reads, not JSON."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from llmflow.placements import age, lease_table

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def row(**kw) -> dict:
    base = dict(run_id="r1", placement="local", pgid=4242, job_id=None, server_alive=True, owner_alive=False)
    return {**base, "created_at": (NOW - timedelta(minutes=75)).isoformat(), **kw}


def test_columns_and_states():
    table = lease_table(
        [row(), row(run_id="r2", placement="slurm", pgid=None, job_id="17", server_alive=False, owner_alive=False)],
        NOW,
    ).splitlines()
    assert table[0].split() == ["RUN", "PLACEMENT", "JOB", "/", "PGID", "AGE", "STATE"]
    assert table[1].split()[:5] == ["r1", "local", "pgid", "4242", "1h15m"]
    assert table[1].endswith("leftover, server running")
    assert "job 17" in table[2] and "None" not in table[2] and table[2].endswith("leftover, server gone")
    assert lease_table([row(owner_alive=True)], NOW).splitlines()[1].endswith("in use (its flow runs)")


def test_nothing_held_and_ages():
    assert lease_table([], NOW) == "no leases: nothing is held"
    assert [age(s) for s in (5, 600, 3 * 3600 + 300, 2 * 86400 + 4 * 3600)] == ["5s", "10m", "3h05m", "2d04h"]
