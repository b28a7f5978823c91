"""The flow's half of the dead-man switch: rewrite each live run's heartbeat file on its host.

The supervisor beside a server started over SSH (a Slurm job, an ssh host) stops the server,
and so ends its job, once ``<run folder>/heartbeat`` has not changed for ``lease_ttl_s``
(``remote.supervisor``). While a session lives, one daemon thread of this process rewrites
that file over the run's own command connection, every fifth of the ttl (at most every
minute), so several renewals in a row may fail (an SSH reconnect, a busy login node) before
the server is stopped. When this process dies, however it dies, the renewals stop with it.

Drivers start a run's heartbeat when its run folder exists on the host (``start``) and stop
it at teardown (``stop``), before its connections close.
"""

from __future__ import annotations

import logging
import shlex
import threading
import time
from dataclasses import dataclass

from llmflow.config import SSHLogin
from llmflow.remote.connections import shell_for
from llmflow.remote.start_script import HEARTBEAT_FILE

log = logging.getLogger("llmflow.heartbeat")

RENEW_EVERY_MAX_S = 60.0
COMMAND_TIMEOUT_S = 15.0


def renew_every(ttl_s: float) -> float:
    """Seconds between renewals: five chances per ttl, at most a minute apart."""
    return max(0.5, min(RENEW_EVERY_MAX_S, ttl_s / 5))


def renew_command(path: str, stamp: float) -> str:
    """Replace the file's content atomically (the supervisor never reads half a write)."""
    q = shlex.quote(path)
    return f"printf '%.3f\\n' {stamp:.3f} > {q}.tmp && mv -f {q}.tmp {q}"


@dataclass
class _Beat:
    run_id: str
    login: SSHLogin | None
    path: str
    ttl_s: float
    next_at: float = 0.0
    failures: int = 0


_BEATS: dict[str, _Beat] = {}
_LOCK = threading.Lock()  # held while renewing, so ``stop`` never races a renewal on a closing connection
_WAKE = threading.Condition(_LOCK)
_thread: threading.Thread | None = None


def start(run_id: str, login: SSHLogin | None, remote_dir: str, ttl_s: float) -> None:
    """Renew ``remote_dir/heartbeat`` for ``run_id`` until ``stop``; the first write happens now."""
    global _thread
    beat = _Beat(run_id, login, f"{remote_dir.rstrip('/')}/{HEARTBEAT_FILE}", ttl_s)
    with _LOCK:
        _renew(beat)
        _BEATS[run_id] = beat
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_loop, name="llmflow-heartbeat", daemon=True)
            _thread.start()
        _WAKE.notify()


def stop(run_id: str) -> None:
    """No more renewals for ``run_id`` (its server is being torn down)."""
    with _LOCK:
        _BEATS.pop(run_id, None)


def running() -> list[str]:
    """Run ids whose heartbeats this process renews."""
    with _LOCK:
        return sorted(_BEATS)


def _renew(beat: _Beat) -> None:
    """One renewal; a failure is logged and retried at the next turn (the ttl allows several)."""
    beat.next_at = time.monotonic() + renew_every(beat.ttl_s)
    try:
        res = shell_for(beat.run_id, beat.login).run(renew_command(beat.path, time.time()), timeout=COMMAND_TIMEOUT_S)
        if res.rc != 0:
            raise OSError(res.stderr.strip() or f"exit {res.rc}")
    except Exception as exc:  # noqa: BLE001 - any failure: try again next turn
        beat.failures += 1
        log.warning(
            "could not renew the heartbeat of run %s (%d in a row): %s; its server stops if this lasts %.0fs",
            beat.run_id, beat.failures, exc, beat.ttl_s,
        )  # fmt: skip
    else:
        if beat.failures:
            log.info("heartbeat of run %s renewed again after %d failures", beat.run_id, beat.failures)
        beat.failures = 0


def _loop() -> None:
    with _LOCK:
        while True:
            now = time.monotonic()
            for beat in list(_BEATS.values()):
                if beat.next_at <= now:
                    _renew(beat)
            due = min((b.next_at for b in _BEATS.values()), default=now + RENEW_EVERY_MAX_S)
            _WAKE.wait(timeout=max(0.05, due - time.monotonic()))
