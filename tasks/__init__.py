"""One Prefect task per lifecycle step; each returns a typed, persisted result."""

from tasks.allocate import allocate_node
from tasks.batch import run_batch_inference
from tasks.benchmark import run_benchmark_cell
from tasks.gate import health_gate
from tasks.record import record_tok_s
from tasks.recover import recover_session
from tasks.teardown import tear_down
from tasks.tunnel import open_tunnel
from tasks.warm import warm_model

__all__ = [
    "allocate_node",
    "warm_model",
    "open_tunnel",
    "health_gate",
    "run_batch_inference",
    "run_benchmark_cell",
    "record_tok_s",
    "recover_session",
    "tear_down",
]
