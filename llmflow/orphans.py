"""Processes started here that must not outlive this process, even when it is SIGKILLed.

A ``finally`` or an ``atexit`` hook runs on a normal exit or Ctrl-C, never on SIGKILL (an
out-of-memory kill, a scheduler killing the flow, ``kill -9``). The OpenSSH forward's master
runs in its own session (so a Ctrl-C at the terminal does not cut the tunnel before teardown),
and would then live on forever. So this module starts one small guard process the first time
it is needed; this process holds the only write end of the guard's stdin and tells it, one line
each, which process groups (or single processes) to stop. When this process ends, however it ends, the kernel closes
that pipe, the guard reads end-of-file and stops what is still registered (SIGTERM, then
SIGKILL after a grace). Linux's ``PR_SET_PDEATHSIG`` would be simpler but fires when the *thread*
that started the child exits, and tasks and replicas start processes from short-lived threads.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

GRACE_S = 3.0

# Runs under this project's Python; standard library only, no project import (fast to start).
# Lines: "+G"/"-G" add or remove process group G, "+pP"/"-pP" a single process P.
GUARD_SOURCE = f"""
import os, signal, sys, time
targets = set()
for line in sys.stdin:
    line = line.strip()
    if line[:1] in "+-" and len(line) > 1:
        target = (line[1] == "p", int(line[2:] if line[1] == "p" else line[1:]))
        (targets.add if line[0] == "+" else targets.discard)(target)
def send(target, sig):
    single, n = target
    try:
        (os.kill if single else os.killpg)(n, sig)
        return True
    except OSError:
        return False
for t in targets:
    send(t, signal.SIGTERM)
deadline = time.monotonic() + {GRACE_S}
while any(send(t, 0) for t in targets) and time.monotonic() < deadline:
    time.sleep(0.05)
for t in targets:
    send(t, signal.SIGKILL)
"""

_LOCK = threading.Lock()
_guard: subprocess.Popen | None = None


def _send(line: str) -> None:
    global _guard
    with _LOCK:
        if _guard is None or _guard.poll() is not None:
            _guard = subprocess.Popen(
                [sys.executable, "-S", "-c", GUARD_SOURCE],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C at the terminal must not end the guard first
                text=True,
                bufsize=1,
            )
        assert _guard.stdin is not None
        _guard.stdin.write(line + "\n")
        _guard.stdin.flush()


def stop_with_this_process(pgid: int) -> None:
    """Stop process group ``pgid`` when this process ends, if it still runs then."""
    _send(f"+{int(pgid)}")


def stop_process_with_this_process(pid: int) -> None:
    """Stop process ``pid`` alone (not its group: it may share ours) when this process ends."""
    _send(f"+p{int(pid)}")


def forget(pgid: int) -> None:
    """``pgid`` was stopped (or will be) by its owner: the guard leaves it alone."""
    if _guard is not None and _guard.poll() is None:
        _send(f"-{int(pgid)}")


def forget_process(pid: int) -> None:
    """As ``forget``, for a process registered with ``stop_process_with_this_process``."""
    if _guard is not None and _guard.poll() is None:
        _send(f"-p{int(pid)}")


def guard_pid() -> int | None:
    """The guard's pid, while it runs (tests check that it goes once its owner is gone)."""
    return _guard.pid if _guard is not None and _guard.poll() is None else None


def _after_fork_in_child() -> None:
    """A forked child must not write to its parent's guard (nor keep the pipe for its own)."""
    global _guard, _LOCK
    if _guard is not None and _guard.stdin is not None:
        os.close(_guard.stdin.fileno())  # only the process that registered holds the pipe open
    _guard, _LOCK = None, threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
