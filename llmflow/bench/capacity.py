"""Capacity search: per context size (and output length), the highest load that still holds.

A load is an ordered value (concurrency today, a request rate for open-loop cells): the search
brackets it (``start``, then times ``factor`` until a cell fails or ``max`` is reached) and then
bisects between the last load that held and the first that failed for ``bisect_steps`` steps.
The search is a pure function of what was measured so far (``next_load``), so a resumed
campaign re-derives where each search stood from ``cells.jsonl`` alone. ``capacity_table``
summarises the searches: per context size, the largest load that held, the first load that
failed and why, and how many cells it took beside a full grid over the same loads.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, model_validator

Load = float  # an int for concurrency; ints compare and sort with floats

# Statuses a search cannot learn from: the cell did not run, so it says nothing of the load.
UNKNOWN_STATUSES = frozenset({"not_run"})


class CapacitySearch(BaseModel):
    """``CampaignConfig.capacity``: search the load per context size instead of running a grid."""

    model_config = ConfigDict(extra="forbid")

    dimension: Literal["concurrency", "rate"] = Field(
        default="concurrency", description="The load searched: requests in flight, or requests per second."
    )
    start: PositiveFloat = Field(default=1, description="First load tried at every context size.")
    factor: float = Field(default=2.0, gt=1, le=100, description="Bracketing: each load is the last times this.")
    max: PositiveFloat = Field(description="Highest load tried; a context that holds it has at least this capacity.")
    bisect_steps: int = Field(
        default=3, ge=0, le=20, description="Cells spent between the last load that held and the first that failed."
    )

    @model_validator(mode="after")
    def _consistent(self) -> CapacitySearch:
        if self.max < self.start:
            raise ValueError(f"max ({self.max:g}) must be at least start ({self.start:g})")
        if self.integral and (self.start != int(self.start) or self.max != int(self.max)):
            raise ValueError("start and max of a concurrency search must be whole numbers")
        return self

    @property
    def integral(self) -> bool:
        """Concurrency is a whole number of requests; a rate is not."""
        return self.dimension == "concurrency"

    def value(self, x: float) -> Load:
        return int(round(x)) if self.integral else round(float(x), 6)

    def bracket(self) -> list[Load]:
        """The bracketing loads: start, start x factor, ... and max last."""
        loads = [self.value(self.start)]
        top = self.value(self.max)
        while loads[-1] < top:
            nxt = self.value(loads[-1] * self.factor)
            if self.integral:
                nxt = max(nxt, loads[-1] + 1)
            loads.append(min(nxt, top))
        return loads

    def most_cells(self) -> int:
        """The most cells one context's search can need."""
        return len(self.bracket()) + self.bisect_steps

    def midpoint(self, lo: Load, hi: Load) -> Load | None:
        """The load halfway between, or None when there is none left to try between them."""
        mid = (lo + hi) // 2 if self.integral else self.value((lo + hi) / 2)
        return mid if lo < mid < hi else None


def next_load(search: CapacitySearch, held: Mapping[Load, bool | None]) -> Load | None:
    """The next load to measure, given ``held`` (load -> whether the cell held; None: it did not
    run), or None when the search is done. A load that did not run stops the search there:
    nothing above it can be decided."""
    lo: Load | None = None
    hi: Load | None = None
    for load in search.bracket():
        if load not in held:
            return load
        if held[load] is None:
            return None
        if not held[load]:
            hi = load
            break
        lo = load
    if hi is None or lo is None:
        return None  # held up to max, or failed at the start
    for _ in range(search.bisect_steps):
        mid = search.midpoint(lo, hi)
        if mid is None:
            return None
        if mid not in held:
            return mid
        if held[mid] is None:
            return None
        lo, hi = (mid, hi) if held[mid] else (lo, mid)
    return None


def slo_met(cell: Any) -> bool | None:
    """Whether the cell met the campaign's SLOs: the ``slo_met`` its summary (or the cell) carries
    when SLOs were stated, None when there is no such verdict (no SLOs: nothing to miss)."""
    for holder in (_get(cell, "summary"), cell):
        value = _get(holder, "slo_met") if holder is not None else None
        if value is not None:
            return bool(value)
    return None


def verdict(cell: Any) -> str:
    """``ok`` for a cell that holds; else its status (rejected, crashed, timed_out, saturated,
    skipped ...), or ``slo`` for an ok cell that missed its SLOs."""
    status = _get(cell, "status")
    if status == "ok" and slo_met(cell) is False:
        return "slo"
    return str(status)


def holds(cell: Any) -> bool | None:
    """Whether a cell holds its load: every request ok and the SLOs (if stated) met; None for a
    cell that did not run."""
    if _get(cell, "status") in UNKNOWN_STATUSES:
        return None
    return verdict(cell) == "ok"


def group_key(cell: Any) -> tuple[int, int]:
    """The search a cell belongs to: its (output length, context)."""
    return int(_get(cell, "output_tokens")), int(_get(cell, "context"))


def load_of(cell: Any, dimension: str) -> Load:
    return _get(cell, dimension)


def measured(cells: Iterable[Any], dimension: str, output_tokens: int, context: int) -> dict[Load, bool | None]:
    """What the search of (output_tokens, context) has learnt from ``cells``."""
    return {load_of(c, dimension): holds(c) for c in cells if group_key(c) == (output_tokens, context)}


def capacity_table(
    search: CapacitySearch, cells: Iterable[Any], contexts: Iterable[int], outputs: Iterable[int]
) -> list[dict[str, Any]]:
    """One row per (output length, context): ``held`` (the largest load that held below the first
    that failed; None when none did), ``failed`` and ``verdict`` (the smallest load that failed
    and why; None when every load held), ``at_max`` (held the max), ``cells`` (cells run),
    ``grid_cells`` (cells a full grid over the campaign's loads needs for this row) and ``done``
    (the search ended; False when the campaign stopped before)."""
    cells = list(cells)
    dimension = search.dimension
    loads = sorted({load_of(c, dimension) for c in cells if holds(c) is not None})
    rows = []
    for out in sorted(outputs):
        for ctx in sorted(contexts):
            mine = [c for c in cells if group_key(c) == (out, ctx) and holds(c) is not None]
            failed = sorted((load_of(c, dimension), verdict(c)) for c in mine if not holds(c))
            first_fail, why = failed[0] if failed else (None, None)
            held = [
                load_of(c, dimension)
                for c in mine
                if holds(c) and (first_fail is None or load_of(c, dimension) < first_fail)
            ]
            rows.append(
                {
                    "context": ctx,
                    "output_tokens": out,
                    "dimension": dimension,
                    "held": max(held) if held else None,
                    "failed": first_fail,
                    "verdict": why,
                    "at_max": bool(held) and max(held) >= search.value(search.max),
                    "cells": len(mine),
                    "grid_cells": len(loads),
                    "done": next_load(search, {load_of(c, dimension): holds(c) for c in mine}) is None,
                }
            )
    return rows


def cells_totals(table: list[dict[str, Any]]) -> tuple[int, int]:
    """Cells the search ran, and cells a full grid over the same loads would need."""
    return sum(r["cells"] for r in table), sum(r["grid_cells"] for r in table)


def _get(cell: Any, name: str) -> Any:
    """A field of a cell: a ``CellResult`` (or its summary) or a row of summary.json."""
    return cell.get(name) if isinstance(cell, Mapping) else getattr(cell, name, None)
