"""A campaign's cells as they end: kept in memory and appended to ``cells.jsonl`` at once, so a
stopped campaign can be resumed with what it measured (``--resume``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from llmflow.batch.jsonl import JsonlAppender
from llmflow.bench.config import CampaignConfig, Cell
from llmflow.results import CellResult


class CellBook:
    """The grid's cells in run order and the results recorded so far; ``on_record(done, total)``
    is told after each (the flow's progress artifact)."""

    def __init__(self, cells: list[Cell], out_dir: Path, on_record: Callable[[int, int], None]) -> None:
        self.cells = cells
        self.path = out_dir / "cells.jsonl"
        self.rows_path = out_dir / "requests.jsonl"
        self.on_record = on_record
        self.results: dict[str, CellResult] = {}

    @classmethod
    def open(
        cls, campaign: CampaignConfig, cells: list[Cell], out_dir: Path, on_record: Callable[[int, int], None]
    ) -> CellBook:
        """A new book, or with ``campaign.resume`` the cells a stopped run already finished; an
        existing campaign folder without resume is refused."""
        book = cls(cells, out_dir, on_record)
        if book.path.exists() and not campaign.resume:
            raise FileExistsError(
                f"campaign.output_dir: {out_dir} already holds a campaign (cells.jsonl); "
                "set campaign.resume (llmflow bench --resume DIR) to finish it, or choose another folder"
            )
        if campaign.resume:
            book.results = resumed_cells(book.path, book.rows_path)
        return book

    def record(self, result: CellResult) -> None:
        self.results[result.key] = result
        with JsonlAppender(self.path) as out:
            out.write(result.model_dump(mode="json"))
        self.on_record(len(self.results), len(self.cells))

    def pending(self) -> list[Cell]:
        return [c for c in self.cells if c.key not in self.results]

    def ordered(self) -> list[CellResult]:
        return [self.results[c.key] for c in self.cells]

    def last_session(self) -> int:
        """The highest server session a recorded cell ran on (0 before any)."""
        return max((r.session for r in self.results.values()), default=0)


def resumed_cells(cells_path: Path, rows_path: Path) -> dict[str, CellResult]:
    """Cells a stopped run of this campaign finished (``cells.jsonl``); rows of any cell it
    did not finish are dropped from ``requests.jsonl``, as that cell runs again."""
    if not cells_path.exists():
        return {}
    done: dict[str, CellResult] = {}
    for line in cells_path.read_text().splitlines():
        try:
            cell = CellResult.model_validate_json(line)
        except ValueError:
            continue  # a torn last line
        if cell.status != "not_run":
            done[cell.key] = cell
    cells_path.write_text("".join(c.model_dump_json() + "\n" for c in done.values()))
    if rows_path.exists():
        kept = [line for line in rows_path.read_text().splitlines() if _row_cell(line) in done]
        rows_path.write_text("".join(line + "\n" for line in kept))
    return done


def _row_cell(line: str) -> str | None:
    try:
        return json.loads(line).get("cell")
    except ValueError:
        return None
