"""The command line refuses a bad --config file before anything starts (exit 2, one message)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli.main import _batch_config, _session_config, build_parser, main
from llmflow.config import PROJECT_ROOT, SAMPLE_INPUT


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


def _fake_venv(tmp_path: Path) -> Path:
    """A venv whose bin/python exists, so the checks get as far as the model."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    return venv


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("top-level typo", "unknown top-level key 'sesion'; did you mean 'session'?"),
        ("missing input", "no such file"),
        ("JSON array input", "a JSON array, not JSONL"),
        ("CSV input", "a CSV table, not JSONL"),
        ("missing model", "model.path:"),
        ("kind typo", "session.placement.kind: unknown kind 'slrum'; did you mean 'slurm'?"),
    ],
)
def test_the_first_hour_mistakes_exit_2_fast_in_a_few_lines_having_started_nothing(tmp_path: Path, case, expected):
    """The real command, as a user runs it: exit 2, at most 3 lines, within 2 s, no run folder, no
    Prefect server (it is checked before Prefect is imported)."""
    runs, out = tmp_path / "runs", tmp_path / "out.jsonl"
    args = ["batch", str(SAMPLE_INPUT), "-o", str(out), "--runs-dir", str(runs), "--venv", str(_fake_venv(tmp_path))]
    if case == "top-level typo":
        args += ["--config", str(_write(tmp_path / "c.json", json.dumps({"sesion": {"placement": {"kind": "slurm"}}})))]
    elif case == "kind typo":
        args += [
            "--config",
            str(_write(tmp_path / "c.json", json.dumps({"session": {"placement": {"kind": "slrum"}}}))),
        ]
    elif case == "missing input":
        args[1] = str(tmp_path / "requests.jsonl")
    elif case == "JSON array input":
        args[1] = str(
            _write(tmp_path / "requests.json", json.dumps([json.loads(SAMPLE_INPUT.read_text().splitlines()[0])]))
        )
    elif case == "CSV input":
        args[1] = str(_write(tmp_path / "requests.csv", "prompt,max_tokens\nhello,4\n"))
    elif case == "missing model":
        args += ["--model", str(tmp_path / "models" / "llama.gguf")]
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=60
    )
    took = time.monotonic() - started
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr and len(lines) <= 3, lines
    assert "Traceback" not in proc.stderr and "prefect" not in proc.stderr.lower()
    assert not runs.exists() and not out.exists()
    assert took < 2.0, f"{case}: {took:.2f}s"


def test_debug_shows_the_traceback_too(tmp_path: Path):
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", "batch", str(tmp_path / "x.jsonl"), "-o", str(tmp_path / "o"), "--debug"],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        timeout=60,
    )
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "no such file" in proc.stderr


def test_a_relative_path_in_a_config_file_is_taken_from_the_files_folder(tmp_path: Path, monkeypatch):
    """The README's vLLM example failed: `.venvs/vllm` was looked for in runs/<id>/."""
    folder = tmp_path / "project"
    (folder / "models" / "tiny-llama-hf").mkdir(parents=True)
    config = _write(
        folder / "vllm.json",
        json.dumps(
            {"session": {"engine": {"kind": "vllm", "venv": ".venvs/vllm"}, "model": {"path": "models/tiny-llama-hf"}}}
        ),
    )
    monkeypatch.chdir(tmp_path)  # somewhere else
    args = build_parser().parse_args(["batch", "in.jsonl", "-o", "out.jsonl", "--config", str(config)])
    session = _session_config(args)
    assert session.engine.venv == folder / ".venvs" / "vllm"
    assert session.model.path == folder / "models" / "tiny-llama-hf"
    batch = _batch_config(args, args.input, args.output)
    assert batch.input_path == tmp_path / "in.jsonl"  # command-line paths: the working directory


def test_path_flags_are_taken_from_the_working_directory(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["hold", "--model", "m.gguf", "--venv", "v", "--runs-dir", "r"])
    session = _session_config(args)
    assert (session.model.path, session.engine.venv, session.runs_dir) == (
        tmp_path / "m.gguf",
        tmp_path / "v",
        tmp_path / "r",
    )
