"""What a pass over the input would send, counted before any server is asked for.

A rerun whose output already answers every line has nothing to send: knowing that up front
lets the flow allocate nothing (no server, no Slurm job) instead of serving a model for 0
requests and reporting 0 req/s.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from llmflow.batch.jsonl import EMBEDDINGS_URL, load_finished, parse_lines


class Pending(BaseModel):
    """The input's lines against the output's finished custom_ids."""

    input_lines: int = Field(description="Non-blank input lines.")
    requests: int = Field(description="Valid lines with a distinct custom_id: what a batch ever sends.")
    invalid_lines: int = Field(description="Malformed lines and duplicate custom_ids: never sent.")
    finished: int = Field(description="custom_ids in the output (the checkpoint), the client's ``already_done``.")
    to_send: int = Field(description="Valid custom_ids of the input not yet in the output.")
    embeddings_to_send: int = Field(
        default=0, description="Of ``to_send``, the /v1/embeddings lines: the server must be started to answer them."
    )


def count_pending(input_path: Path, output_path: Path) -> Pending:
    """One streaming pass over the input, the same readers as the client's pass.

    Error records taken out by ``retry_errors`` are already gone from the output, so their
    lines count as to send. Like the client, a torn last output line is cut off.
    """
    finished = load_finished(output_path)
    requests = invalid = to_send = embeddings = 0
    for parsed in parse_lines(input_path):
        if parsed.request is None:
            invalid += 1
            continue
        requests += 1
        if parsed.request.custom_id not in finished:
            to_send += 1
            embeddings += parsed.request.url == EMBEDDINGS_URL
    return Pending(
        input_lines=requests + invalid,
        requests=requests,
        invalid_lines=invalid,
        finished=len(finished),
        to_send=to_send,
        embeddings_to_send=embeddings,
    )
