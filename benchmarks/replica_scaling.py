"""Does a batch go N times as fast on N replicas? One batch flow against 1, 2 and 4 replicas.

Each replica is ``benchmarks/slot_server.py`` run by the ``command`` engine on the local
placement: a fixed number of requests at once (``--slots``) and a fixed sleep per token, so
one replica's throughput is known and cheap on the CPU, and the machine's two cores measure
the orchestration (spreading, gating, the batch client), not a model. The same input and the
same concurrency (enough to fill every slot of the largest set) go to each replica count;
runs are interleaved (1, 2, 4, 1, 2, 4, ...) and the median of ``--repeats`` is reported with
its ratio to N times the one-replica median, two ways: requests over the batch pass's whole
wall time (which starts before the first replica is ready: sending waits for it, and the others
join as they pass their gates), and requests over the time spent sending (the wall time less
that first wait, ``BatchReport.waited_s``). The concurrency is twice the slots of the largest
set, so every replica has requests queued and a slot never waits on the client.

Run: ``.venv/bin/python benchmarks/replica_scaling.py [--requests 1200] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flows.batch import batch_inference  # noqa: E402
from llmflow.config import BatchConfig, CommandEngine, SessionConfig  # noqa: E402


def write_input(path: Path, n: int, tokens: int) -> Path:
    with path.open("w") as f:
        for i in range(n):
            body = {"model": "slot-server", "prompt": f"p{i}", "max_tokens": tokens}
            f.write(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions", "body": body}) + "\n")
    return path


def one_run(replicas: int, input_path: Path, work: Path, args: argparse.Namespace, run_no: int) -> tuple[float, float]:
    engine = CommandEngine(
        argv=[
            sys.executable, str(ROOT / "benchmarks" / "slot_server.py"), "--host", "{host}", "--port", "{port}",
            "--slots", str(args.slots), "--token-ms", str(args.token_ms),
        ],
        launcher_python=sys.executable,
    )  # fmt: skip
    session = SessionConfig(engine=engine, replicas=replicas, runs_dir=work / "runs")
    out = work / f"out-{replicas}-{run_no}.jsonl"
    batch = BatchConfig(input_path=input_path, output_path=out, concurrency=2 * args.slots * max(args.counts))
    report = batch_inference(session=session, batch=batch).report
    assert report.succeeded == args.requests, report
    return report.succeeded / report.wall_s, report.succeeded / (report.wall_s - report.waited_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--tokens", type=int, default=20, help="output tokens per request")
    parser.add_argument("--token-ms", type=float, default=5.0)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="llmflow-scaling-") as tmp:
        work = Path(tmp)
        input_path = write_input(work / "in.jsonl", args.requests, args.tokens)
        rates: dict[int, list[tuple[float, float]]] = {n: [] for n in args.counts}
        for run_no in range(args.repeats):
            for n in args.counts:
                rates[n].append(one_run(n, input_path, work, args, run_no))
                wall, sending = rates[n][-1]
                print(
                    f"run {run_no + 1}: {n} replica(s): {wall:.1f} req/s over the pass, {sending:.1f} sending",
                    flush=True,
                )

    base = args.counts[0]
    one = [statistics.median(r[k] for r in rates[base]) / base for k in (0, 1)]
    ideal = args.slots / (args.tokens * args.token_ms / 1000)
    print()
    print(
        f"{args.requests} requests x {args.tokens} tokens, {args.token_ms} ms/token, {args.slots} slots per replica "
        f"(one replica's ceiling {ideal:.1f} req/s), concurrency {2 * args.slots * max(args.counts)}; "
        f"medians of {args.repeats}, interleaved"
    )
    print(
        f"{'replicas':>8} {'req/s (pass)':>13} {'ratio to N x one':>17} {'req/s (sending)':>16} {'ratio to N x one':>17}"
    )
    for n in args.counts:
        wall, sending = (statistics.median(r[k] for r in rates[n]) for k in (0, 1))
        print(f"{n:>8} {wall:>13.1f} {wall / (n * one[0]):>17.3f} {sending:>16.1f} {sending / (n * one[1]):>17.3f}")


if __name__ == "__main__":
    main()
