"""The orphan guard: processes registered with it end when their owner is SIGKILLed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from llmflow.remote.procs import group_alive
from tests.conftest import pid_gone, wait_until

OWNER = """
import subprocess, sys, time
from llmflow import orphans
keep = subprocess.Popen(["sleep", "300"], start_new_session=True)
drop = subprocess.Popen(["sleep", "300"], start_new_session=True)
single = subprocess.Popen(["sleep", "300"])  # in our own group: stopped alone
orphans.stop_with_this_process(keep.pid)
orphans.stop_process_with_this_process(single.pid)
orphans.stop_with_this_process(drop.pid)
orphans.forget(drop.pid)
print(keep.pid, drop.pid, orphans.guard_pid(), single.pid, flush=True)
time.sleep(300)
"""


def test_registered_groups_end_when_the_owner_is_sigkilled():
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True, start_new_session=True)
    keep, drop, guard, single = (int(x) for x in owner.stdout.readline().split())
    try:
        assert group_alive(keep) and group_alive(drop)
        owner.send_signal(signal.SIGKILL)  # no finally, no atexit
        owner.wait()
        deadline = time.monotonic() + 10
        while group_alive(keep) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not group_alive(keep), "the registered group outlived its owner"
        assert wait_until(lambda: pid_gone(single), 10), "the registered process outlived its owner"
        assert group_alive(drop), "a forgotten group was stopped too"
        deadline = time.monotonic() + 10
        while group_alive(guard) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not group_alive(guard), "the guard itself stayed"
    finally:
        for pgid in (keep, drop):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except OSError:
                pass
