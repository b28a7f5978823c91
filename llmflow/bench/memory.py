"""Peak memory of a model server during a campaign cell, where this machine can see it.

RSS is summed over every process of the server's process group (vLLM runs its engine in a
child process) from /proc, sampled in a background thread. GPU memory is what ``nvidia-smi``
reports as used on all GPUs of this machine (not per process: a shared GPU counts its other
users too). Both are only meaningful for the local placement; elsewhere they stay None.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")


def group_rss_bytes(pgid: int, proc: Path = Path("/proc")) -> int:
    """Resident bytes of all processes in process group ``pgid``."""
    total = 0
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
            if int(fields[2]) == pgid:  # fields: state, ppid, pgrp, ...
                total += int((entry / "statm").read_text().split()[1]) * PAGE
        except (OSError, ValueError, IndexError):
            continue  # exited while we looked
    return total


def gpu_used_mib() -> float | None:
    """Sum of memory.used over this machine's GPUs, or None without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        return float(sum(float(x) for x in out.split()))
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


class PeakSampler:
    """Samples while the ``with`` body runs; ``peak_rss_mib`` / ``peak_gpu_mib`` after."""

    def __init__(self, pgid: int | None, interval_s: float = 0.2) -> None:
        self.pgid = pgid
        self.interval_s = interval_s
        self.peak_rss_mib: float | None = None
        self.peak_gpu_mib: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._gpu = shutil.which("nvidia-smi") is not None

    def _sample(self) -> None:
        if self.pgid is not None:
            rss = group_rss_bytes(self.pgid) / 2**20
            if rss and (self.peak_rss_mib is None or rss > self.peak_rss_mib):
                self.peak_rss_mib = rss
        if self._gpu:
            gpu = gpu_used_mib()
            if gpu is not None and (self.peak_gpu_mib is None or gpu > self.peak_gpu_mib):
                self.peak_gpu_mib = gpu

    def _run(self) -> None:
        while True:
            self._sample()
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> PeakSampler:
        if self.pgid is not None or self._gpu:
            self._thread = threading.Thread(target=self._run, name="llmflow-mem", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
