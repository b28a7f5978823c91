"""The command line refuses a bad --config file before anything starts (exit 2, one message)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli.main import main
from llmflow.config import SAMPLE_INPUT


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"sesion": {"placement": {"kind": "slurm"}}}, "unknown top-level key 'sesion'; did you mean 'session'?"),
        ({"session": {}, "jobs": {}}, "unknown top-level key 'jobs' (expected session or batch)"),
        ("[1, 2]", "expected"),
        ("{not json", "not valid JSON"),
    ],
)
def test_a_bad_config_file_exits_2_before_anything_starts(tmp_path: Path, capsys, content, message):
    config = tmp_path / "config.json"
    config.write_text(content if isinstance(content, str) else json.dumps(content))
    runs = tmp_path / "runs"
    code = main(
        [
            "batch",
            str(SAMPLE_INPUT),
            "-o",
            str(tmp_path / "out.jsonl"),
            "--config",
            str(config),
            "--runs-dir",
            str(runs),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and message in err
    assert not runs.exists() and not (tmp_path / "out.jsonl").exists()  # nothing was allocated or written


def test_a_missing_config_file_exits_2(tmp_path: Path, capsys):
    code = main(["hold", "--config", str(tmp_path / "nope.json")])
    assert code == 2 and "No such file or directory" in capsys.readouterr().err
