"""Engines: the server software. ``spec_for(config.engine)`` answers everything the project asks
of an engine (``EngineSpec``). Each engine is one module here that registers its spec class
under its config's ``kind``; this package imports them all.
"""

from __future__ import annotations

from typing import Any

from llmflow.engines.base import ENGINES, PORT_PLACEHOLDER, EngineSpec, LaunchSpec, MultiNodeLaunch
from llmflow.registry import import_all

import_all(__name__, __path__, skip=("base", "figures"))


def spec_for(engine: Any) -> EngineSpec:
    """The spec of an engine config (``LlamaCppEngine``, ``VllmEngine`` ...)."""
    return ENGINES.get(getattr(engine, "kind", repr(engine)))(engine)


__all__ = ["ENGINES", "PORT_PLACEHOLDER", "EngineSpec", "LaunchSpec", "MultiNodeLaunch", "spec_for"]
