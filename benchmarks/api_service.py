"""The API service: memory and speed of a 200 MB upload; batch retrieve latency, idle and with 20 in flight.

Phase ``upload`` starts ``llmflow api serve --no-supervisor`` as a subprocess (a temp data folder,
SQLite, ``LLMFLOW_API_MAX_FILE_BYTES`` above the upload), creates a key with ``llmflow api keys
create``, then with the official openai SDK:

* uploads a generated ~200 MiB OpenAI batch JSONL (valid chat-completion lines), streamed by
  the SDK from the open file, while the server's RSS is sampled every 50 ms from
  ``/proc/<pid>/status`` (VmRSS; VmHWM, the kernel's own peak, is reported too): peak RSS and MB/s;
* downloads it again (``files.content``, streamed) and checks it is byte-identical;
* creates 20 batches through the API (the supervisor is off, so they stay ``validating``, i.e.
  in flight, as rows the handlers read like any other) and times 1000 sequential
  ``batches.retrieve`` calls, round-robin over them: p50/p90/p99/max (p50/p99 also with a plain
  httpx client, to show what the SDK adds). This is the idle figure: nothing else runs.

Phase ``inflight`` measures the same retrieves while the service really works: the stack of
``tests/integration/test_api_service.py`` (``prefect server start``, a process worker,
``deployments/deploy.py``, a global concurrency limit ``api-nodes`` of 2 as the node limit, a
catalog of two names served by the tiny GGUF model with llama-cpp-python) and ``llmflow api
serve`` with its supervisor on. Four client threads create 20 batches of 200 chat lines
(max_tokens 8); once none is still ``validating``, some are ``in_progress`` and lines are being
answered (model servers up, not just flow runs created), it times sequential
``batches.retrieve`` calls round-robin over them (1000, or until all are done), recording how
many were in_progress/validating/finalizing meanwhile. It also reads the API
process's CPU time (utime+stime, ``/proc/<pid>/stat``) per second of wall time: with no batch,
while the retrieves run, in a quiet window with batches in flight and no client calls (what
supervising them costs), and over the whole phase. Then it cancels what is left, waits for
every batch to reach a final state, stops everything and checks no llama_cpp.server is left.

Prints a table and writes ``out/bench/api_service.json`` (a phase run alone keeps the other
phase's figures already in the file; the in-flight table compares with them).

Run from the repository root: ``.venv/bin/python benchmarks/api_service.py [--phase upload|inflight|all]
[--mib 200] [--retrieves 1000]``; the in-flight phase takes a few minutes on two cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
from openai.types import Batch

ROOT = Path(__file__).resolve().parent.parent
LLMFLOW = ROOT / ".venv" / "bin" / "llmflow"
OUT = ROOT / "out" / "bench" / "api_service.json"
sys.path.insert(0, str(ROOT))  # tests.integration.prefect_stack (phase 2) when run as benchmarks/api_service.py


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_input(path: Path, mib: int) -> int:
    """~``mib`` MiB of batch lines (about 1 KiB each); the file's size in bytes."""
    filler = "lorem ipsum dolor sit amet " * 34
    target, i = mib * 1024**2, 0
    with path.open("w") as f:
        while f.tell() < target:
            body = {"model": "tiny", "max_tokens": 16, "messages": [{"role": "user", "content": f"{i} {filler}"}]}
            f.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}))
            f.write("\n")
            i += 1
    return path.stat().st_size


def status_kib(pid: int, field: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


class RssSampler:
    """VmRSS of ``pid`` every ``every_s`` in a thread, while in the ``with`` block."""

    def __init__(self, pid: int, every_s: float = 0.05) -> None:
        self.pid, self.every_s, self.samples = pid, every_s, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(status_kib(self.pid, "VmRSS"))
            self._stop.wait(self.every_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mib(self) -> float:
        return max(self.samples) / 1024


def wait_ready(url: str, key: str, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"llmflow api serve exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/v1/files", headers={"Authorization": f"Bearer {key}"}).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise SystemExit("llmflow api serve did not answer in time")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--phase", choices=("upload", "inflight", "all"), default="all", help="what to run (default all)"
    )
    parser.add_argument("--mib", type=int, default=200, help="size of the uploaded file (default 200 MiB)")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--retrieves", type=int, default=1000)
    parser.add_argument("--lines", type=int, default=200, help="chat lines per batch in the in-flight phase")
    parser.add_argument(
        "--poll-s", type=float, help="LLMFLOW_API_POLL_S in the in-flight phase (default: the service's own, 2 s)"
    )
    parser.add_argument("--json", type=Path, default=OUT)
    args = parser.parse_args()

    result = json.loads(args.json.read_text()) if args.json.exists() else {}
    rows: list[tuple[str, str]] = []
    if args.phase in ("upload", "all"):
        result.update(upload_phase(args))
        save(result, args.json)
        rows += upload_rows(result)
    if args.phase in ("inflight", "all"):
        result["inflight"] = inflight_phase(args)
        save(result, args.json)
        rows += inflight_rows(result)
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(f"json: {args.json}")
    return 0


def save(result: dict, path: Path) -> None:
    """After each phase, so a failing second phase keeps the first one's figures."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def upload_phase(args: argparse.Namespace) -> dict:
    """Phase 1: the HTTP layer alone (``--no-supervisor``): upload, download, idle retrieves."""
    with tempfile.TemporaryDirectory(prefix="llmflow-api-bench-") as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLMFLOW_API_")}
        env["LLMFLOW_API_MAX_FILE_BYTES"] = str((args.mib + 64) * 1024**2)
        t = time.monotonic()
        size = write_input(tmp / "input.jsonl", args.mib)
        print(f"input: {size / 1024**2:.0f} MiB written in {time.monotonic() - t:.1f}s", file=sys.stderr)

        created = subprocess.run(
            [str(LLMFLOW), "api", "keys", "create", "bench", "--data-dir", str(data)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        key = re.search(r"^llmflow-\S+$", created.stdout, re.M).group(0)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen(
            [str(LLMFLOW), "api", "serve", "--no-supervisor", "--data-dir", str(data), "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(tmp / "serve.log", "w"),  # noqa: SIM115 - closed with the process
        )
        try:
            wait_ready(url, key, proc)
            result = measure(proc.pid, url, key, tmp / "input.jsonl", size, args)
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if proc.returncode not in (0, -signal.SIGINT):
            print((tmp / "serve.log").read_text()[-3000:], file=sys.stderr)
    return result


def upload_rows(result: dict) -> list[tuple[str, str]]:
    r = result["retrieve"]
    return [
        ("server RSS idle (MiB)", f"{result['rss_idle_mib']:.0f}"),
        ("server RSS peak during upload (MiB, 50 ms samples)", f"{result['upload']['rss_peak_mib']:.0f}"),
        ("server VmHWM after upload (MiB, kernel's peak)", f"{result['upload']['vmhwm_mib']:.0f}"),
        ("upload MB/s", f"{result['upload']['mb_per_s']:.1f}  ({result['upload']['mib']:.0f} MiB in {result['upload']['seconds']:.1f}s)"),
        ("server RSS peak during download (MiB)", f"{result['download']['rss_peak_mib']:.0f}"),
        ("download MB/s (byte-identical)", f"{result['download']['mb_per_s']:.1f}  ({result['download']['identical']})"),
        (f"retrieve p50 / p90 / p99 / max (ms), openai SDK, {r['n']} calls", f"{r['sdk_p50_ms']:.2f} / {r['sdk_p90_ms']:.2f} / {r['sdk_p99_ms']:.2f} / {r['sdk_max_ms']:.2f}"),
        ("retrieve p50 / p99 (ms), plain httpx", f"{r['httpx_p50_ms']:.2f} / {r['httpx_p99_ms']:.2f}"),
    ]  # fmt: skip


def measure(pid: int, url: str, key: str, source: Path, size: int, args: argparse.Namespace) -> dict:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=600)
    idle = status_kib(pid, "VmRSS") / 1024

    with RssSampler(pid) as up, source.open("rb") as f:
        t = time.perf_counter()
        file = client.files.create(file=f, purpose="batch")
        upload_s = time.perf_counter() - t
    assert file.bytes == size, (file.bytes, size)
    vmhwm = status_kib(pid, "VmHWM") / 1024

    digest = hashlib.sha256()
    with RssSampler(pid) as down:
        t = time.perf_counter()
        with client.files.with_streaming_response.content(file.id) as response:
            for block in response.iter_bytes(1024**2):
                digest.update(block)
        download_s = time.perf_counter() - t
    with source.open("rb") as f:
        identical = digest.hexdigest() == hashlib.file_digest(f, "sha256").hexdigest()

    ids = [
        client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h").id
        for _ in range(args.batches)
    ]
    sdk = []
    for i in range(args.retrieves):
        t = time.perf_counter()
        client.batches.retrieve(ids[i % len(ids)])
        sdk.append((time.perf_counter() - t) * 1000)
    plain = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as http:
        for i in range(args.retrieves):
            t = time.perf_counter()
            http.get(f"/v1/batches/{ids[i % len(ids)]}").raise_for_status()
            plain.append((time.perf_counter() - t) * 1000)

    return {
        "rss_idle_mib": round(idle, 1),
        "upload": {
            "mib": round(size / 1024**2, 1),
            "seconds": round(upload_s, 2),
            "mb_per_s": round(size / 1e6 / upload_s, 1),
            "rss_peak_mib": round(up.peak_mib, 1),
            "vmhwm_mib": round(vmhwm, 1),
            "rss_samples": len(up.samples),
        },
        "download": {
            "seconds": round(download_s, 2),
            "mb_per_s": round(size / 1e6 / download_s, 1),
            "rss_peak_mib": round(down.peak_mib, 1),
            "identical": identical,
        },
        "retrieve": {
            "batches": len(ids),
            "n": args.retrieves,
            "how": "batches created through the API with the supervisor off (they stay validating)",
            "sdk_p50_ms": round(statistics.median(sdk), 3),
            "sdk_p90_ms": round(percentile(sdk, 90), 3),
            "sdk_p99_ms": round(percentile(sdk, 99), 3),
            "sdk_max_ms": round(max(sdk), 3),
            "httpx_p50_ms": round(statistics.median(plain), 3),
            "httpx_p99_ms": round(percentile(plain, 99), 3),
        },
        "machine": {"cpus": os.cpu_count()},
    }


# --- phase 2: retrieves with 20 batches really running --------------------------------------

NODE_LIMIT = 2
CLIENTS = 4
MAX_TOKENS = 8
SERVED = {"tiny-a": "tiny-a-served", "tiny-b": "tiny-b-served"}  # catalog name -> served name, as the test
FINAL = {"completed", "failed", "expired", "cancelled"}
TRACKED = ("in_progress", "validating", "finalizing")
IDLE_S = 5  # the supervisor on, no batch: its baseline
QUIET_S = 10  # batches in flight, no client call: what supervising them costs
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid``: fields 14 and 15 of /proc/<pid>/stat (after the name, which may hold spaces)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class CpuWindow:
    """CPU seconds ``pid`` used per second of wall time since the window opened (1.0: one core busy)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.wall0, self.cpu0 = pid, time.monotonic(), cpu_seconds(pid)

    def read(self) -> dict:
        wall, cpu = time.monotonic() - self.wall0, cpu_seconds(self.pid) - self.cpu0
        return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 2), "cpu_per_s": round(cpu / wall, 3)}


def llama_servers(marker: str) -> list[list[str]]:
    """Argument lists of this run's processes that mention llama_cpp.server: the launcher names the
    run folder on its command line, the server inherits the stack's PREFECT_HOME; both lie under
    ``marker`` (the phase's temp folder), so servers of other runs on the machine do not count."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes()
            if b"llama_cpp.server" in cmdline and marker.encode() in cmdline + (proc / "environ").read_bytes():
                found.append(cmdline.decode(errors="replace").split("\0"))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def is_server(argv: list[str]) -> bool:
    """The model server itself (``python -m llama_cpp.server``), not the launcher that wraps it."""
    return argv[1:3] == ["-m", "llama_cpp.server"]


class ServerWatch:
    """Peak number of model servers running at once, sampled every 0.5 s in a thread: the node
    limit should keep it at 2 however many batches are in flight."""

    def __init__(self, marker: str) -> None:
        self.marker, self.peak = marker, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, sum(map(is_server, llama_servers(self.marker))))
            self._stop.wait(0.5)

    def __enter__(self) -> ServerWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def write_catalog(root: Path) -> Path:
    """The test's catalog: two names, each a session config serving the tiny GGUF model with
    llama-cpp-python (n_ctx 256), their run folders under ``root/runs``, the ``api-nodes`` limit."""
    entries = []
    for name, served in SERVED.items():
        session = {
            "model": {"path": str(ROOT / "models" / "tiny-llama.gguf"), "served_name": served},
            "engine": {"kind": "llama_cpp", "n_ctx": 256},
            "runs_dir": str(root / "runs"),
            "node_limit": "api-nodes",
        }
        (root / f"{name}.json").write_text(json.dumps({"session": session}))
        entries.append(f'[models.{name}]\nconfig = "{name}.json"\n')
    catalog = root / "catalog.toml"
    catalog.write_text("\n".join(entries))
    return catalog


def create_key(env: dict[str, str]) -> str:
    """What an admin runs: ``llmflow api keys create NAME``; the key is printed once."""
    out = subprocess.run(
        [sys.executable, "-m", "cli.main", "api", "keys", "create", "bench"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return re.search(r"^llmflow-\S+$", out, re.M).group(0)


@contextmanager
def running_stack(root: Path, poll_s: float | None) -> Iterator[tuple[subprocess.Popen, str, str]]:
    """The stack of tests/integration/test_api_service.py in ``root``: a Prefect server and process
    worker, the project's deployments, the node limit, and ``llmflow api serve`` with its
    supervisor; yields the API process, its URL and a key. The API, worker and server are stopped
    after (in that order), whatever happened."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    from tests.integration.prefect_stack import deploy, prefect_client, prefect_server_and_worker, stop

    catalog = write_catalog(root)
    (root / "prefect-home").mkdir()
    with prefect_server_and_worker(root / "prefect-home", {"PREFECT_WORKER_QUERY_SECONDS": "1"}) as env:
        if (res := deploy(env)).returncode != 0:
            raise SystemExit("deployments/deploy.py failed:\n" + res.stdout[-3000:] + res.stderr[-3000:])
        with prefect_client(env) as client:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="api-nodes", limit=NODE_LIMIT))
        env = {k: v for k, v in env.items() if not k.startswith("LLMFLOW_API_")}
        env |= {"LLMFLOW_API_DATA_DIR": str(root / "data"), "LLMFLOW_API_CATALOG": str(catalog)}
        if poll_s is not None:
            env["LLMFLOW_API_POLL_S"] = str(poll_s)
        key, port = create_key(env), free_port()
        api = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "api", "serve", "--port", str(port)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=(root / "api.log").open("wb"),
            start_new_session=True,  # stop() ends its process group
        )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, key, api, timeout_s=180)
            yield api, url, key
        finally:
            stop(api)


def batch_lines(n: int, model: str, batch: int) -> str:
    """``n`` chat lines with max_tokens 8: a batch of 200 keeps a model server busy for a while."""
    lines = []
    for i in range(n):
        body = {"model": model, "max_tokens": MAX_TOKENS, "messages": [{"role": "user", "content": f"say {i}"}]}
        lines.append({"custom_id": f"b{batch}-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
    return "".join(json.dumps(line) + "\n" for line in lines)


def create_batches(url: str, key: str, folder: Path, count: int, lines: int) -> list[str]:
    """``count`` batches from CLIENTS threads at once, as several users' scripts would send them
    (upload, then create); they alternate between the catalog's two names."""

    def client_work(c: int) -> list[str]:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)
        ids = []
        for k in range(c, count, CLIENTS):
            path = folder / f"in-{k}.jsonl"
            path.write_text(batch_lines(lines, list(SERVED)[k % 2], k))
            with path.open("rb") as f:
                file_id = client.files.create(file=f, purpose="batch").id
            batch = client.batches.create(
                input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            ids.append(batch.id)
        return ids

    with ThreadPoolExecutor(CLIENTS) as pool:
        return [i for ids in pool.map(client_work, range(CLIENTS)) for i in ids]


def retrieve_all(client: openai.OpenAI, ids: list[str]) -> dict[str, Batch]:
    return {i: client.batches.retrieve(i) for i in ids}


def by_status(latest: dict[str, Batch]) -> dict[str, int]:
    return dict(Counter(b.status for b in latest.values()))


def answered(latest: dict[str, Batch]) -> int:
    """Lines answered so far, over all batches (``request_counts`` is kept live while in_progress)."""
    return sum(b.request_counts.completed for b in latest.values() if b.request_counts)


def all_final(latest: dict[str, Batch]) -> bool:
    return all(b.status in FINAL for b in latest.values())


def wait_running(client: openai.OpenAI, ids: list[str], timeout_s: float) -> dict[str, Batch]:
    """The batches once none is validating and lines are being answered: flow runs started,
    model servers up under the node limit, the supervisor counting progress. Measuring as soon
    as the flow runs exist would time the retrieves before any real work competes with them."""
    deadline = time.monotonic() + timeout_s
    while True:
        latest = retrieve_all(client, ids)
        counts = by_status(latest)
        if counts.get("in_progress") and not counts.get("validating") and answered(latest):
            return latest
        if time.monotonic() > deadline:
            raise SystemExit(f"no batch answering lines after {timeout_s:.0f}s: {counts}")
        time.sleep(0.5)


def latency(ms: list[float]) -> dict:
    return {
        "p50_ms": round(statistics.median(ms), 3),
        "p90_ms": round(percentile(ms, 90), 3),
        "p99_ms": round(percentile(ms, 99), 3),
        "max_ms": round(max(ms), 3),
    }


def time_retrieves(client: openai.OpenAI, ids: list[str], latest: dict[str, Batch], n: int) -> dict:
    """``n`` sequential ``batches.retrieve`` calls round-robin over ``ids`` (as phase 1), or fewer
    once every batch is final. Each call refreshes ``latest``, so the status mix the service was
    handling is known throughout: at start, at end, and the min-max of each active status."""
    start, answered_at_start = by_status(latest), answered(latest)
    span = {s: [start.get(s, 0)] * 2 for s in TRACKED}
    ms = []
    for i in range(n):
        if all_final(latest):
            break
        batch_id = ids[i % len(ids)]
        t = time.perf_counter()
        latest[batch_id] = client.batches.retrieve(batch_id)
        ms.append((time.perf_counter() - t) * 1000)
        counts = by_status(latest)
        for s in TRACKED:
            span[s] = [min(span[s][0], counts.get(s, 0)), max(span[s][1], counts.get(s, 0))]
    return {
        "n": len(ms),
        **latency(ms),
        "statuses_at_start": start,
        "statuses_at_end": by_status(latest),
        "min_max_during": span,
        "lines_answered_at_start": answered_at_start,
        "lines_answered_at_end": answered(latest),
    }


def quiet_window(pid: int, client: openai.OpenAI, ids: list[str], latest: dict[str, Batch]) -> dict | None:
    """The API's CPU per second over QUIET_S with no client call, if batches are still in flight:
    the supervisor's passes over them (reading and moving the batches, polling Prefect) alone."""
    if all_final(latest):
        return None
    before = by_status(latest)
    window = CpuWindow(pid)
    time.sleep(QUIET_S)
    cpu = window.read()
    latest.update(retrieve_all(client, ids))
    return {**cpu, "statuses_before": before, "statuses_after": by_status(latest)}


def cancel_and_settle(client: openai.OpenAI, ids: list[str], latest: dict[str, Batch], timeout_s: float) -> dict:
    """Cancels every batch not final yet (a 409: it reached finalizing or a final state meanwhile)
    and waits until each is final, so no flow run or model server outlives the phase. How long
    each cancelled batch took to become final is kept: a flow run cancelled just as its process
    starts can exit leaving the run Cancelling (Prefect's UnfinishedRun), and then only the
    Prefect server's cancelling timeout (300 s) makes it Cancelled and the batch final."""
    asked = []
    for batch_id in ids:
        if latest[batch_id].status not in FINAL:
            try:
                client.batches.cancel(batch_id)
                asked.append(batch_id)
            except openai.ConflictError:
                pass
    t = time.monotonic()
    settled: dict[str, float] = {}
    while not all_final(latest):
        if time.monotonic() - t > timeout_s:
            raise SystemExit(f"batches not final {timeout_s:.0f}s after cancel: {by_status(latest)}")
        time.sleep(1)
        for batch_id in ids:
            if latest[batch_id].status not in FINAL:
                latest[batch_id] = client.batches.retrieve(batch_id)
                if latest[batch_id].status in FINAL:
                    settled[batch_id] = time.monotonic() - t
    waits = [settled[i] for i in asked if i in settled] or [0.0]
    return {
        "cancel_requested": len(asked),
        "settle_p50_s": round(statistics.median(waits), 1),
        "settle_max_s": round(max(waits), 1),
        "final": by_status(latest),
        "lines_completed": answered(latest),
        "lines_total": sum(b.request_counts.total for b in latest.values() if b.request_counts),
    }


def supervise_and_measure(pid: int, url: str, key: str, root: Path, args: argparse.Namespace) -> dict:
    """The in-flight phase on a running stack, from the supervisor's idle baseline to every batch final."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)
    idle = CpuWindow(pid)
    time.sleep(IDLE_S)
    idle_cpu = idle.read()
    phase = CpuWindow(pid)
    with ServerWatch(str(root)) as servers:
        ids = create_batches(url, key, root, args.batches, args.lines)
        created_s = phase.read()["wall_s"]
        latest = wait_running(client, ids, timeout_s=600)
        print(f"{len(ids)} batches in flight: {by_status(latest)}, {answered(latest)} lines answered", file=sys.stderr)
        running_s = phase.read()["wall_s"]
        during = CpuWindow(pid)
        retrieve = time_retrieves(client, ids, latest, args.retrieves)
        retrieve_cpu = during.read()
        quiet = quiet_window(pid, client, ids, latest)
        end = cancel_and_settle(client, ids, latest, timeout_s=600)
    return {
        "how": (
            f"{len(ids)} batches of {args.lines} chat lines (max_tokens {MAX_TOKENS}) from {CLIENTS} client threads, "
            f"supervisor on, node limit {NODE_LIMIT}, tiny GGUF model on llama-cpp-python (n_ctx 256)"
        ),
        "batches": len(ids),
        "lines_per_batch": args.lines,
        "poll_s": args.poll_s if args.poll_s is not None else "service default",
        "created_after_s": created_s,
        "running_after_s": running_s,
        "retrieve": retrieve,
        "peak_model_servers": servers.peak,
        "api_cpu": {
            "supervisor_no_batch": idle_cpu,
            "during_retrieves": retrieve_cpu,
            "in_flight_no_client_calls": quiet,
            "whole_phase": phase.read(),
        },
        "end": end,
    }


def wait_no_llama(marker: str, timeout_s: float = 30) -> list[list[str]]:
    """This run's llama_cpp.server processes still there ``timeout_s`` after the stack stopped."""
    deadline = time.monotonic() + timeout_s
    while (left := llama_servers(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def print_logs(root: Path) -> None:
    """The tails of the API's, the worker's and the server's logs, when the phase failed."""
    for log in (
        root / "api.log",
        root / "prefect-home" / "logs" / "worker.log",
        root / "prefect-home" / "logs" / "server.log",
    ):
        if log.exists():
            print(f"--- {log.name} ---\n{log.read_text(errors='replace')[-3000:]}", file=sys.stderr)


def inflight_phase(args: argparse.Namespace) -> dict:
    """Phase 2: retrieve latency and the API's CPU with batches really running (see the docstring)."""
    with tempfile.TemporaryDirectory(prefix="llmflow-api-inflight-") as tmp:
        root = Path(tmp)
        t = time.monotonic()
        try:
            with running_stack(root, args.poll_s) as (api, url, key):
                print(f"stack up in {time.monotonic() - t:.0f}s", file=sys.stderr)
                result = supervise_and_measure(api.pid, url, key, root, args)
        except BaseException:
            print_logs(root)
            raise
        left = wait_no_llama(str(root))
    if left:
        print(f"LEFT BEHIND: {len(left)} llama_cpp.server process(es): {[' '.join(argv) for argv in left]}")
    else:
        print("no llama_cpp.server process left after the API, worker and Prefect server stopped")
    result["llama_servers_left"] = len(left)
    result["seconds"] = round(time.monotonic() - t, 1)
    return result


def mix(by_status: dict[str, int] | None) -> str:
    """``{"in_progress": 18, "completed": 2}`` -> ``in_progress 18, completed 2``."""
    return ", ".join(f"{s} {n}" for s, n in sorted((by_status or {}).items(), key=lambda kv: -kv[1])) or "-"


def inflight_rows(result: dict) -> list[tuple[str, str]]:
    """The in-flight figures beside phase 1's idle ones (from this run or the JSON file)."""
    f, r, cpu = result["inflight"], result["inflight"]["retrieve"], result["inflight"]["api_cpu"]
    idle = result.get("retrieve", {})
    quartet = "{p50:.2f} / {p90:.2f} / {p99:.2f} / {max:.2f}"
    idle_value = (
        quartet.format(p50=idle["sdk_p50_ms"], p90=idle["sdk_p90_ms"], p99=idle["sdk_p99_ms"], max=idle["sdk_max_ms"])
        if "sdk_p90_ms" in idle
        else "- (no phase 1 figures)"
    )
    span = " / ".join(f"{lo}-{hi}" for lo, hi in (r["min_max_during"][s] for s in TRACKED))
    quiet = cpu["in_flight_no_client_calls"]
    end = f["end"]
    return [
        (f"in flight: {f['batches']} batches x {f['lines_per_batch']} lines, {CLIENTS} clients, node limit {NODE_LIMIT}", f"poll_s {f['poll_s']}; measured from {f['running_after_s']:.0f}s after the first create"),
        (f"retrieve p50 / p90 / p99 / max (ms), idle (phase 1), {idle.get('n', '-')} calls", idle_value),
        (f"retrieve p50 / p90 / p99 / max (ms), in flight, {r['n']} calls", quartet.format(p50=r["p50_ms"], p90=r["p90_ms"], p99=r["p99_ms"], max=r["max_ms"])),
        ("  batches at the first retrieve", mix(r["statuses_at_start"])),
        ("  batches at the last retrieve", mix(r["statuses_at_end"])),
        ("  in_progress / validating / finalizing meanwhile (min-max)", span),
        ("  lines answered at the first / last retrieve", f"{r['lines_answered_at_start']} / {r['lines_answered_at_end']}"),
        (f"model servers at once (peak; node limit {NODE_LIMIT})", str(f["peak_model_servers"])),
        (f"API CPU s per wall s: supervisor on, no batch ({cpu['supervisor_no_batch']['wall_s']:.0f}s)", f"{cpu['supervisor_no_batch']['cpu_per_s']:.3f}"),
        (f"API CPU s per wall s: during the retrieves ({cpu['during_retrieves']['wall_s']:.0f}s)", f"{cpu['during_retrieves']['cpu_per_s']:.3f}"),
        (
            f"API CPU s per wall s: in flight, no client call ({quiet['wall_s']:.0f}s)" if quiet else "API CPU s per wall s: in flight, no client call",
            f"{quiet['cpu_per_s']:.3f}  ({mix(quiet['statuses_before'])})" if quiet else "- (all done before)",
        ),
        (f"API CPU s per wall s: whole phase, first create to all final ({cpu['whole_phase']['wall_s']:.0f}s)", f"{cpu['whole_phase']['cpu_per_s']:.3f}"),
        ("batches at the end", f"{mix(end['final'])}  ({end['cancel_requested']} cancelled here; final after p50 {end['settle_p50_s']:.0f}s, max {end['settle_max_s']:.0f}s)"),
        ("lines answered", f"{end['lines_completed']} of {end['lines_total']}"),
        ("llama_cpp.server processes left after stopping", str(f["llama_servers_left"])),
    ]  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
