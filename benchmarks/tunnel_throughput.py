"""The data path, side by side in one run: a direct connection, the project's SSH forward,
the same with two forwards (two SSH connections, requests dealt round-robin over their local
ports), plain OpenSSH ``ssh -L`` and the older in-process paramiko forward, all through the
test sshd.

Loads (aiohttp client, as ``vllm bench serve`` uses):

* requests/s against a server that answers at once, and one that answers after 50 ms, at 16
  and 64 requests in flight (``--slow-waves`` rounds of 50 ms at either);
* streamed completions: 64 streams at once, each 200 token events at a fixed rate
  (``--token-interval-ms``, 10 ms: 100 tokens/s per stream); token events/s delivered and the
  time to first token each path adds to the direct one (p50, p99), twice: all 64 started in
  the same instant (a campaign's first wave: the 64 requests cross the path as one burst), and
  steady (one started every stream-length / 64, TTFT of those started once 64 are in flight:
  a campaign after its first wave, each new request alongside 63 streams' token events).
  The burst runs ``--bursts`` times per path and repeat and its TTFTs are pooled: one burst's
  median moves by several ms from one burst to the next on this machine. With it, the CPU time
  the forward's ssh and the sshd session use per token event carried.

Each load first opens its connections (one untimed request per connection, all at once), so
the figures are the data path's, not connection set-up's.

And the clients on the hot path, against the same server directly:

* the batch client (``llmflow.batch.client.run_batch``: reads the input, sends, parses usage,
  appends each record) against a bare aiohttp loop, 16 in flight;
* the campaign's streaming client (``llmflow.bench.stream.run_requests``) against a bare
  aiohttp SSE loop: CPU time per token event at 64 streams.

Every path/client runs once per repeat, interleaved, so drift on a shared machine hits all
alike; medians over ``--repeats`` are reported with ratios. The server (uvicorn) runs in its
own process. Needs the test cluster's sshd (``scripts/test_cluster.sh up``).

Run: ``.venv/bin/python benchmarks/tunnel_throughput.py [--repeats 3] [--json out.json]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.client_throughput import RESPONSE, free_port  # noqa: E402

SERVER_APP = """
import asyncio, json
RESPONSE = {response!r}
JSON = [(b"content-type", b"application/json"), (b"content-length", str(len(RESPONSE)).encode())]
SSE = [(b"content-type", b"text/event-stream")]
TOKENS, INTERVAL = {tokens}, {interval}
EVENT = b'data: {{"id":"c","object":"text_completion","choices":[{{"index":0,"text":"x","finish_reason":null}}]}}\\n\\n'
LAST = (b'data: {{"id":"c","object":"text_completion","choices":[{{"index":0,"text":"","finish_reason":"length"}}],'
        b'"usage":{{"prompt_tokens":8,"completion_tokens":' + str(TOKENS).encode() + b',"total_tokens":0}}}}\\n\\n'
        b"data: [DONE]\\n\\n")

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    if scope["path"] == "/slow":
        await asyncio.sleep(0.05)
    if b'"stream": true' not in body:
        await send({{"type": "http.response.start", "status": 200, "headers": JSON}})
        await send({{"type": "http.response.body", "body": RESPONSE}})
        return
    await send({{"type": "http.response.start", "status": 200, "headers": SSE}})
    start = asyncio.get_running_loop().time()
    for i in range(TOKENS):  # a fixed rate: event i leaves at start + i * INTERVAL
        delay = start + i * INTERVAL - asyncio.get_running_loop().time()
        if delay > 0:
            await asyncio.sleep(delay)
        await send({{"type": "http.response.body", "body": EVENT, "more_body": True}})
    await send({{"type": "http.response.body", "body": LAST}})
"""

STREAM_BODY = json.dumps({"model": "bench", "prompt": "hi", "stream": True}).encode()


def start_server(workdir: Path, tokens: int, interval_s: float) -> tuple[subprocess.Popen, int]:
    (workdir / "tunnel_app.py").write_text(SERVER_APP.format(response=RESPONSE, tokens=tokens, interval=interval_s))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "tunnel_app:app", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "warning", "--no-access-log"],
        cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    _wait_port(port)
    return proc, port


def _stop(server: subprocess.Popen) -> None:
    server.terminate()
    server.wait(10)


def _wait_port(port: int, timeout_s: float = 20.0) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


class ProcessCPU:
    """CPU time (user + system, s) used since creation by the forward's ssh process and by
    the test sshd's session processes (the sshd children of ``sshd_pid``; sessions of the other
    paths are idle while one path is measured)."""

    def __init__(self, ssh_pids: list[int], sshd_pid: int) -> None:
        self.ssh_pids, self.sshd_pid = ssh_pids, sshd_pid
        self.start = self._now()

    @staticmethod
    def _stat(pid: int) -> list[str]:
        text = Path(f"/proc/{pid}/stat").read_text()
        return text[text.rindex(")") + 2 :].split()  # fields from the third on

    def _cpu(self, pid: int) -> float:
        try:
            fields = self._stat(pid)
        except OSError:
            return 0.0  # a session that ended meanwhile
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def _now(self) -> dict[str, float]:
        sessions = [
            int(pid)
            for pid in os.listdir("/proc")
            if pid.isdigit() and pid != str(self.sshd_pid) and self._parent(int(pid)) == self.sshd_pid
        ]
        return {"ssh": sum(self._cpu(pid) for pid in self.ssh_pids), "sshd": sum(self._cpu(pid) for pid in sessions)}

    def _parent(self, pid: int) -> int | None:
        try:
            return int(self._stat(pid)[1])
        except (OSError, ValueError):
            return None  # gone meanwhile

    def used(self) -> dict[str, float]:
        now = self._now()
        return {k: now[k] - self.start[k] for k in now}


# -- paths ------------------------------------------------------------------------------------
def test_login():
    from llmflow.config import SSHLogin

    env_file = ROOT / "build" / "testcluster" / "env"
    if not env_file.exists():
        sys.exit("needs the test cluster's sshd: scripts/test_cluster.sh up")
    env = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
    return SSHLogin(
        host=env["LLMFLOW_TEST_SSH_HOST"], port=int(env["LLMFLOW_TEST_SSH_PORT"]), user=env["LLMFLOW_TEST_SSH_USER"],
        key_file=Path(env["LLMFLOW_TEST_SSH_KEY"]), known_hosts=Path(env["LLMFLOW_TEST_KNOWN_HOSTS"]),
    )  # fmt: skip


class PlainOpenSSH:
    """``ssh -N -L`` as a person types it: OpenSSH's defaults, no tuning."""

    def __init__(self, login, port: int) -> None:
        self.local_port = free_port()
        self.proc = subprocess.Popen(
            ["ssh", "-N", "-p", str(login.port), "-i", str(login.key_file), "-l", login.user,
             "-o", f"UserKnownHostsFile={login.known_hosts}", "-o", "BatchMode=yes",
             "-L", f"127.0.0.1:{self.local_port}:127.0.0.1:{port}", login.host],
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        _wait_port(self.local_port)

    def close(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(5)


def open_paths(
    login, port: int, cleanup: contextlib.ExitStack
) -> tuple[dict[str, str | list[str]], dict[str, list[int]]]:
    """Base URL(s) per path and each forward's ssh pids; each path is closed by ``cleanup``
    as soon as it is open, so one that fails to open leaves none of the others running."""
    from llmflow.remote.shell import SSHShell
    from llmflow.remote.tunnel import LocalForward, OpenSSHForward

    def opened(thing):
        cleanup.callback(thing.close)
        return thing

    project = opened(OpenSSHForward(login, "127.0.0.1", port))
    pair = [opened(OpenSSHForward(login, "127.0.0.1", port)) for _ in range(2)]
    plain = opened(PlainOpenSSH(login, port))
    shell = opened(SSHShell(login))
    old = opened(LocalForward(lambda: shell.transport, "127.0.0.1", port))
    paths = {
        "direct": f"http://127.0.0.1:{port}",
        "llmflow forward": f"http://127.0.0.1:{project.local_port}",
        "two llmflow forwards": [f"http://127.0.0.1:{f.local_port}" for f in pair],
        "openssh ssh -L": f"http://127.0.0.1:{plain.local_port}",
        "paramiko forward (before)": f"http://127.0.0.1:{old.local_port}",
    }
    pids = {"llmflow forward": [project.pid], "two llmflow forwards": [f.pid for f in pair]}
    return paths, pids


# -- loads --------------------------------------------------------------------------------------
async def requests_per_s(bases: str | list[str], path: str, inflight: int, n: int) -> float:
    """``n`` POSTs with ``inflight`` at a time, dealt round-robin over ``bases``; requests per second."""
    bases = _as_list(bases)
    slots = asyncio.Semaphore(inflight)
    body = json.dumps({"model": "bench", "prompt": "hi", "max_tokens": 16}).encode()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=inflight)) as session:

        async def one(i: int) -> None:
            async with slots, session.post(bases[i % len(bases)] + path, data=body) as resp:
                await resp.read()
                assert resp.status == 200

        await _fill_pool(session, bases, inflight)
        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        return n / (time.perf_counter() - start)


def _as_list(bases: str | list[str]) -> list[str]:
    return [bases] if isinstance(bases, str) else bases


async def _fill_pool(session: aiohttp.ClientSession, bases: str | list[str], connections: int) -> None:
    """Open ``connections`` kept-alive connections before timing (one request each at once), as
    a batch or campaign does after its first requests: what is timed is the data path, not
    connection set-up (through a forward each new connection is a new SSH channel)."""
    bases = _as_list(bases)
    body = json.dumps({"model": "bench", "prompt": "hi"}).encode()

    async def one(i: int) -> None:
        async with session.post(bases[i % len(bases)] + "/v1/completions", data=body) as resp:
            await resp.read()

    await asyncio.gather(*(one(i) for i in range(connections)))


async def stream_load(bases: str | list[str], streams: int) -> tuple[float, list[float]]:
    """``streams`` streamed completions at once, dealt round-robin over ``bases``; token events
    per second and each TTFT (s)."""
    bases = _as_list(bases)
    ttfts: list[float] = []
    events = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=streams)) as session:
        await _fill_pool(session, bases, streams)

        async def one(i: int) -> None:
            nonlocal events
            sent = time.perf_counter()
            first = None
            async with session.post(bases[i % len(bases)] + "/v1/completions", data=STREAM_BODY) as resp:
                async for line in resp.content:
                    if line.startswith(b"data: {") and b'"text":"x"' in line:
                        events += 1
                        if first is None:
                            first = time.perf_counter() - sent
            ttfts.append(first if first is not None else float("nan"))

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(streams)))
        return events / (time.perf_counter() - start), ttfts


async def stream_steady(bases: str | list[str], streams: int, stream_s: float) -> list[float]:
    """``2 * streams`` streamed completions, one started every ``stream_s / streams``: after
    the first ``streams`` (the ramp) about ``streams`` are in flight when each starts, as in
    a campaign once its first requests have finished. The TTFTs (s) of the second half: what
    a new request waits while the path carries the others' token events."""
    bases = _as_list(bases)
    ttfts: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=2 * streams)) as session:
        await _fill_pool(session, bases, streams + streams // 4)

        async def one(i: int) -> None:
            await asyncio.sleep(i * stream_s / streams)
            sent = time.perf_counter()
            first = None
            async with session.post(bases[i % len(bases)] + "/v1/completions", data=STREAM_BODY) as resp:
                async for line in resp.content:
                    if first is None and line.startswith(b"data: {"):
                        first = time.perf_counter() - sent
            if i >= streams:
                ttfts.append(first if first is not None else float("nan"))

        await asyncio.gather(*(one(i) for i in range(2 * streams)))
    return ttfts


async def bare_loop(base: str, inflight: int, n: int) -> float:
    return await requests_per_s(base, "/v1/completions", inflight, n)


def batch_client(base: str, inflight: int, n: int, workdir: Path) -> float:
    from llmflow.batch.client import run_batch_sync
    from llmflow.config import BatchConfig

    inp, out = workdir / "in.jsonl", workdir / "out.jsonl"
    if not inp.exists():
        line = {
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": "bench", "prompt": "hi", "max_tokens": 16},
        }
        inp.write_text("".join(json.dumps({"custom_id": f"r{i}", **line}) + "\n" for i in range(n)))
    out.unlink(missing_ok=True)
    report = run_batch_sync(BatchConfig(input_path=inp, output_path=out, concurrency=inflight), base)
    assert report.succeeded == n, report
    return n / report.wall_s


# -- the run -----------------------------------------------------------------------------------
def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def pct(xs: list[float], p: float) -> float:
    xs = sorted(x for x in xs if x == x)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--client-repeats", type=int, default=5, help="repeats of the client comparison")
    parser.add_argument("--client-requests", type=int, default=10000, help="requests per run of the batch clients")
    parser.add_argument("--fast-requests", type=int, default=3000)
    parser.add_argument(
        "--slow-waves",
        type=int,
        default=40,
        help="requests to the 50 ms server per in-flight slot (64 in flight: 2,560 requests, about 2.5 s)",
    )
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--token-interval-ms", type=float, default=10.0)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument(
        "--bursts", type=int, default=5, help="stream loads per path and repeat (TTFTs pooled: one burst is noisy)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    from llmflow.bench.stream import StreamRequest, run_requests

    login = test_login()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as cleanup:
        workdir = Path(tmp)
        server, port = start_server(workdir, args.tokens, args.token_interval_ms / 1000)
        cleanup.callback(_stop, server)
        paths, ssh_pids = open_paths(login, port, cleanup)
        sshd_pid = int((ROOT / "build" / "testcluster" / "sshd.pid").read_text())
        results: dict[str, dict[str, list[float]]] = {p: {} for p in paths}
        clients: dict[str, list[float]] = {}
        forward_cpu: dict[str, dict[str, list[float]]] = {}
        for base in paths.values():  # warm every path once
            asyncio.run(requests_per_s(base, "/fast", 16, 200))
        for r in range(args.repeats):
            for name, base in paths.items():
                row = results[name]
                for inflight in (16, 64):
                    rate = asyncio.run(requests_per_s(base, "/fast", inflight, args.fast_requests))
                    row.setdefault(f"fast c{inflight} req/s", []).append(rate)
                    n = args.slow_waves * inflight  # as many 50 ms rounds at 16 and at 64 in flight
                    rate = asyncio.run(requests_per_s(base, "/slow", inflight, n))
                    row.setdefault(f"50ms c{inflight} req/s", []).append(rate)
                cpu = ProcessCPU(ssh_pids[name], sshd_pid) if name in ssh_pids else None
                for _ in range(args.bursts):
                    rate, ttfts = asyncio.run(stream_load(base, args.streams))
                    row.setdefault(f"stream x{args.streams} events/s", []).append(rate)
                    row.setdefault("ttfts", []).extend(ttfts)
                if cpu is not None:  # ssh's and sshd's CPU time per token event carried
                    for proc, used in cpu.used().items():
                        forward_cpu.setdefault(name, {}).setdefault(proc, []).append(
                            1e6 * used / (args.bursts * args.streams * args.tokens)
                        )
                stream_s = args.tokens * args.token_interval_ms / 1000
                row.setdefault("steady ttfts", []).extend(asyncio.run(stream_steady(base, args.streams, stream_s)))
            print(f"repeat {r + 1}/{args.repeats} done", file=sys.stderr)

        direct = paths["direct"]
        reqs = [StreamRequest(f"s{i}", STREAM_BODY, 8, args.tokens) for i in range(args.streams)]
        for _ in range(args.client_repeats):
            clients.setdefault("bare aiohttp loop req/s", []).append(
                asyncio.run(bare_loop(direct, 16, args.client_requests))
            )
            clients.setdefault("llmflow batch client req/s", []).append(
                batch_client(direct, 16, args.client_requests, workdir)
            )
            before = time.process_time()
            rate, ttfts = asyncio.run(stream_load(direct, args.streams))
            clients.setdefault("bare SSE loop CPU us/event", []).append(
                1e6 * (time.process_time() - before) / (args.streams * args.tokens)
            )
            before = time.process_time()
            done, _ = asyncio.run(run_requests(direct, None, reqs, args.streams, 60.0))
            assert all(t.outcome == "ok" for _, t in done), [t.error for _, t in done if t.outcome != "ok"][:3]
            clients.setdefault("llmflow stream client CPU us/event", []).append(
                1e6 * (time.process_time() - before) / (args.streams * args.tokens)
            )

    report(results, clients, forward_cpu, args)


def report(
    results: dict[str, dict[str, list[float]]],
    clients: dict[str, list[float]],
    forward_cpu: dict[str, dict[str, list[float]]],
    args,
) -> None:
    direct, ossh = results["direct"], results["openssh ssh -L"]
    d50 = pct(direct["ttfts"], 50)
    d99 = pct(direct["ttfts"], 99)
    s50, s99 = pct(direct["steady ttfts"], 50), pct(direct["steady ttfts"], 99)
    figures: dict[str, dict[str, float]] = {}
    metrics = [k for k in direct if not k.endswith("ttfts")]
    print(
        f"\nmedians of {args.repeats} interleaved runs; streams: {args.tokens} tokens every {args.token_interval_ms} ms"
    )
    print(
        f"{'path':<28}"
        + "".join(f"{m:>22}" for m in metrics)
        + "".join(f"{h:>16}" for h in ("+TTFT p50 ms", "+TTFT p99 ms", "steady +p50 ms", "steady +p99 ms"))
    )
    for name, row in results.items():
        med = {m: median(row[m]) for m in metrics}
        added = {
            "added_ttft_p50_ms": 1000 * (pct(row["ttfts"], 50) - d50),
            "added_ttft_p99_ms": 1000 * (pct(row["ttfts"], 99) - d99),
            "steady_added_ttft_p50_ms": 1000 * (pct(row["steady ttfts"], 50) - s50),
            "steady_added_ttft_p99_ms": 1000 * (pct(row["steady ttfts"], 99) - s99),
        }
        figures[name] = {**med, **added}
        print(
            f"{name:<28}"
            + "".join(f"{med[m]:>22,.0f}" for m in metrics)
            + "".join(f"{v:>16.2f}" for v in added.values())
        )
    print(
        f"(+TTFT: all {args.streams} streams started at once; steady: one started every "
        f"{args.tokens * args.token_interval_ms / args.streams:.0f} ms while {args.streams} are in flight; "
        f"direct TTFT p50 {1000 * d50:.2f} / steady {1000 * s50:.2f} ms)"
    )
    cpu = {name: {k: median(v) for k, v in procs.items()} for name, procs in forward_cpu.items()}
    for name in cpu:
        fwd = figures[name]
        print(f"\nratios, {name}")
        for m in metrics:
            print(
                f"  {m:<24} forward/direct {fwd[m] / figures['direct'][m]:.3f}   "
                f"forward/openssh {fwd[m] / median(ossh[m]):.3f}"
            )
        print(
            f"  CPU per token event at {args.streams} streams: ssh {cpu[name]['ssh']:.1f} us, "
            f"sshd {cpu[name]['sshd']:.1f} us (a direct connection: none; on this machine they share the "
            "cores with the client and the server)"
        )
    print("\nclients, direct to the server, medians of", args.client_repeats)
    cmed = {k: median(v) for k, v in clients.items()}
    for k, v in cmed.items():
        print(f"  {k:<36} {v:>10,.1f}")
    print(
        f"  batch client / bare loop {cmed['llmflow batch client req/s'] / cmed['bare aiohttp loop req/s']:.3f}; "
        f"stream client CPU per event / bare {cmed['llmflow stream client CPU us/event'] / cmed['bare SSE loop CPU us/event']:.3f}"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"paths": figures, "forward_cpu_us_per_event": cpu, "clients": cmed, "args": vars(args)},
                default=str,
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
