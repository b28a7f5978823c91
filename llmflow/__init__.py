"""llmflow: self-hosted LLM inference on clusters as Prefect flows.

The core library, free of Prefect: configs (``config``), typed results (``results``), errors
(``errors``), engines, placements, remote access, the batch client and campaign arithmetic.
The flows, tasks, blocks and the ``llmflow`` command are built on it, one level up.
"""

from llmflow.bench.config import CampaignConfig
from llmflow.config import BatchConfig, ModelConfig, SessionConfig
from llmflow.errors import ConfigError, LLMFlowError, PermanentError, ServerDied
from llmflow.results import (
    Allocation,
    BatchReport,
    CampaignResult,
    CellResult,
    Ready,
    ServerHandle,
    Teardown,
    TokPS,
    Tunnel,
)

__version__ = "0.2.0"

__all__ = [
    "Allocation",
    "BatchConfig",
    "BatchReport",
    "CampaignConfig",
    "CampaignResult",
    "CellResult",
    "ConfigError",
    "LLMFlowError",
    "ModelConfig",
    "PermanentError",
    "Ready",
    "ServerDied",
    "ServerHandle",
    "SessionConfig",
    "Teardown",
    "TokPS",
    "Tunnel",
    "__version__",
]
