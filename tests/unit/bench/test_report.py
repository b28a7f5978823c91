"""What a reader of a campaign's outputs sees: the plot's axes, cells.csv's numbers, which
folders are written, and the command lines the shipped campaign files show."""

from __future__ import annotations

import csv
import json
import re
import shlex
from pathlib import Path
from typing import get_args

import pytest

from cli.main import build_parser
from llmflow.bench.metrics import CellStatus
from llmflow.bench.report import (
    INT_COLUMNS,
    PANELS,
    STATUS_MARKERS,
    TABLE_DECIMALS,
    campaign_figure,
    cells_frame,
    cells_table,
    output_names,
    table_records,
    write_outputs,
)
from llmflow.config import PROJECT_ROOT
from llmflow.results import CellResult

CAMPAIGNS = PROJECT_ROOT / "benchmarks" / "campaigns"
CONTEXTS = [32, 64, 128, 240, 512]


def _cell(context: int, concurrency: int, status: str = "ok", requests: int | None = None) -> CellResult:
    """A cell with many-digit figures when it ran ok, none when it did not run."""
    ran = status not in ("skipped", "not_run")
    summary = (
        {
            "completed": concurrency * 2 if status == "ok" else 0,
            "total_output_tokens": 16 * concurrency,
            "prefill_tok_per_s": 1234.567891234 + context,
            "decode_tok_per_s": 98.76543210987,
            "mean_ttft_ms": 12.3456789012 * context / 32,
            "output_throughput": 333.3333333333 * concurrency,
            "mean_in_flight": 0.99999999,
        }
        if ran
        else {}
    )
    return CellResult(
        key=f"ctx{context}-c{concurrency}-out8",
        context=context,
        concurrency=concurrency,
        output_tokens=8,
        status=status,
        requests=requests if requests is not None else (concurrency * 2 if ran else 0),
        summary=summary,
        peak_rss_mib=123.456789 if ran else None,
        session=1,
    )


def _campaign() -> list[CellResult]:
    """concurrency 1: ok up to 240, 512 rejected; concurrency 4: 240 crashed, 512 not run."""
    return [
        *(_cell(c, 1) for c in CONTEXTS[:4]),
        _cell(512, 1, "rejected"),
        *(_cell(c, 4) for c in CONTEXTS[:3]),
        _cell(240, 4, "crashed"),
        _cell(512, 4, "not_run"),
    ]


def _drawn_statuses(ax) -> dict[str, list[int]]:
    return {
        line.get_gid().removeprefix("status:"): sorted(int(x) for x in line.get_xdata())
        for line in ax.get_lines()
        if (line.get_gid() or "").startswith("status:")
    }


def test_plot_ticks_are_the_measured_contexts_and_cells_that_did_not_run_ok_are_drawn():
    """Stumbles: ticks at 2^n instead of the campaign's contexts; rejected cells missing."""
    fig = campaign_figure(cells_frame(_campaign()), "t")
    axes = fig.get_axes()
    assert [ax.get_ylabel() for ax in axes] == [label for _, label in PANELS]
    for ax in axes:
        assert [t.get_text() for t in ax.get_xticklabels()] == [str(c) for c in CONTEXTS]
        assert list(ax.get_xticks()) == CONTEXTS
        assert not ax.get_xticks(minor=True).size  # no 2^n or 10^n minor ticks between them
        assert _drawn_statuses(ax) == {"rejected": [512], "crashed": [240], "not_run": [512]}
    legend = {t.get_text() for t in fig.legends[0].get_texts()}
    assert {"concurrency 1", "concurrency 4", "rejected", "crashed", "not_run"} <= legend


def test_plot_has_a_panel_of_the_cells_total_output_rate():
    """Stumble: only per-request rates, no throughput of all concurrent requests together."""
    axes = campaign_figure(cells_frame(_campaign()), "t").get_axes()
    (aggregate,) = [ax for ax in axes if "all requests" in ax.get_ylabel()]
    c4 = [line for line in aggregate.get_lines() if not line.get_gid()][1]  # second series: concurrency 4
    assert list(c4.get_xdata()) == [32, 64, 128]
    assert list(c4.get_ydata()) == pytest.approx([333.3333333333 * 4] * 3)


def test_plot_of_a_campaign_where_nothing_ran_ok_still_shows_survival():
    fig = campaign_figure(cells_frame([_cell(64, 1, "rejected"), _cell(128, 1, "skipped")]), "t")
    ax = fig.get_axes()[0]
    assert _drawn_statuses(ax) == {"rejected": [64], "skipped": [128]}
    assert [t.get_text() for t in ax.texts] == ["no ok cell has this figure"]


def test_every_cell_status_but_ok_has_its_own_marker():
    assert set(STATUS_MARKERS) == set(get_args(CellStatus)) - {"ok"}
    assert len(set(STATUS_MARKERS.values())) == len(STATUS_MARKERS)


def _csv(cells: list[CellResult], tmp_path: Path) -> list[dict[str, str]]:
    path = tmp_path / "cells.csv"
    cells_table(cells).to_csv(path, index=False)
    with path.open() as f:
        return list(csv.DictReader(f))


def test_cells_csv_writes_counts_as_integers_and_figures_rounded(tmp_path: Path):
    """Stumbles: counts written as 4.0 (a skipped cell's empty count made the column float),
    and 16-digit floats."""
    rows = _csv(_campaign(), tmp_path)
    counts = [col for col in rows[0] if col in INT_COLUMNS]
    assert {"context", "concurrency", "output_tokens", "requests", "session", "completed"} <= set(counts)
    for row in rows:
        for col in counts:
            assert re.fullmatch(r"\d*", row[col]), (col, row[col])
        for col, value in row.items():
            if re.fullmatch(r"-?\d+\.\d+", value):
                assert len(value.split(".")[1]) <= TABLE_DECIMALS, (col, value)
    first = rows[0]
    assert first["completed"] == "2" and first["mean_ttft_ms"] == "12.346" and first["peak_rss_mib"] == "123.457"
    assert rows[-1]["completed"] == "" and rows[-1]["status"] == "not_run"


def test_table_artifact_rows_are_plain_json(tmp_path: Path):
    records = table_records(cells_table(_campaign()))
    json.dumps(records, allow_nan=False)  # no numpy ints, no NaN
    assert records[0]["completed"] == 2 and records[-1]["completed"] is None


def test_vllm_folder_only_when_requests_were_sent(tmp_path: Path):
    """Stumble: an empty vllm/ folder; the folder is for any engine that sent requests, since
    vllm bench serve's result format compares any OpenAI-compatible server."""
    none_sent = tmp_path / "none"
    none_sent.mkdir()
    cells = [_cell(64, 1, "skipped"), _cell(128, 1, "not_run")]
    paths = write_outputs(none_sent, cells, none_sent / "requests.jsonl", {"engine": "llama_cpp"}, [])
    assert "vllm" not in paths and not (none_sent / "vllm").exists()
    assert output_names(none_sent) == ["summary.json", "cells.csv", "plot.png"]

    sent = tmp_path / "sent"
    sent.mkdir()
    row = {"cell": "ctx32-c1-out8", "warmup": False, "outcome": "ok", "prompt_tokens": 32, "completion_tokens": 8}
    (sent / "requests.jsonl").write_text(json.dumps({**row, "ttft_s": 0.01, "itl_s": [0.1], "error": None}) + "\n")
    paths = write_outputs(sent, [_cell(32, 1, requests=1)], sent / "requests.jsonl", {"engine": "llama_cpp"}, [])
    assert json.loads((paths["vllm"] / "ctx32-c1-out8.json").read_text())["backend"] == "llama_cpp"
    assert output_names(sent) == ["summary.json", "cells.csv", "requests.parquet", "plot.png", "vllm/"]


def _commands_in_comments(path: Path) -> list[list[str]]:
    """The arguments of every ``llmflow ...`` command a comment line shows (up to a closing
    parenthesis or backtick), whether on a line of its own or inside a sentence."""
    found = []
    for line in path.read_text().splitlines():
        if not line.lstrip().startswith("#"):
            continue
        for match in re.finditer(r"(?:^|[\s(`])(?:\S*/)?llmflow[ \t]+([^)`#]*)", line.lstrip()[1:]):
            found.append(shlex.split(match.group(1)))
    return found


def test_campaign_file_comments_show_only_commands_the_cli_has():
    """Stumble: a shipped campaign's comment named `llmflow bench --campaign ... --n-ctx`."""
    files = sorted(CAMPAIGNS.glob("*.toml")) + sorted(CAMPAIGNS.glob("*.yaml"))
    shown = [(path.name, args) for path in files for args in _commands_in_comments(path)]
    assert len(shown) >= len(files)  # each file shows how to run it
    parser = build_parser()
    for name, args in shown:
        try:
            parser.parse_args(args)
        except SystemExit as exc:
            pytest.fail(f"{name}: `llmflow {shlex.join(args)}` does not parse (exit {exc.code})")
