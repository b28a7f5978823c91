"""`llmflow batch --catalog FILE --model NAME`: --model names a catalog entry, a name the catalog
has not exits 2 before anything starts; and a batch with /v1/embeddings lines an engine cannot
serve exits 2 naming the field."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli.main import _batch_config, _session_config, build_parser, main
from llmflow.config import DEFAULT_MODEL, PROJECT_ROOT, SAMPLE_INPUT


def _catalog(tmp_path: Path, default: str | None = "tiny") -> Path:
    configs = tmp_path / "configs"
    configs.mkdir(exist_ok=True)
    (configs / "tiny.json").write_text(
        json.dumps({"session": {"model": {"path": str(DEFAULT_MODEL), "served_name": "tiny-llama"}}})
    )
    path = tmp_path / "catalog.toml"
    path.write_text(
        (f'default = "{default}"\n' if default else "")
        + '[models.tiny]\nconfig = "configs/tiny.json"\n[models.big]\nmodel_server_block = "llama3-70b"\n'
    )
    return path


def _run(args: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        timeout=60,
        env={**os.environ, **(env or {})},
    )
    return proc, time.monotonic() - started


@pytest.mark.parametrize(
    ("model", "default", "expected"),
    [
        ("tinny", "tiny", "--model: model 'tinny' is not in the catalog (one of big, tiny); did you mean 'tiny'?"),
        ("gpt-4o-mini", "tiny", "--model: model 'gpt-4o-mini' is not in the catalog (one of big, tiny)"),
        (None, None, "--model: no model named and the catalog has no default (one of big, tiny)"),
    ],
)
def test_a_name_the_catalog_has_not_exits_2_fast_having_started_nothing(tmp_path: Path, model, default, expected):
    """Even with a default: a name typed on the command line must not run another model."""
    runs, out = tmp_path / "runs", tmp_path / "out.jsonl"
    catalog = _catalog(tmp_path, default)
    args = ["batch", str(SAMPLE_INPUT), "-o", str(out), "--runs-dir", str(runs), "--catalog", str(catalog)]
    proc, took = _run(args + (["--model", model] if model else []))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"llmflow batch: --catalog {catalog}, {expected}"
    assert not runs.exists() and not out.exists() and took < 2.0


def test_the_catalog_comes_from_the_environment_and_an_empty_flag_turns_it_off(tmp_path: Path):
    catalog = _catalog(tmp_path)
    out = tmp_path / "out.jsonl"
    proc, _ = _run(["batch", str(SAMPLE_INPUT), "-o", str(out), "--model", "tinny"], {"LLMFLOW_CATALOG": str(catalog)})
    assert proc.returncode == 2 and "did you mean 'tiny'?" in proc.stderr
    # without a catalog --model is the model's path again
    proc, _ = _run(
        ["batch", str(SAMPLE_INPUT), "-o", str(out), "--catalog", "", "--model", str(tmp_path / "tinny.gguf")],
        {"LLMFLOW_CATALOG": str(catalog)},
    )
    assert proc.returncode == 2 and "model.path:" in proc.stderr and "tinny.gguf does not exist" in proc.stderr


def test_a_session_from_both_config_and_catalog_is_refused(tmp_path: Path, capsys):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"session": {}, "batch": {"concurrency": 2}}))
    args = ["batch", str(SAMPLE_INPUT), "-o", str(tmp_path / "o.jsonl"), "--catalog", str(_catalog(tmp_path))]
    assert main([*args, "--config", str(config)]) == 2
    assert "has a session table, and --catalog gives the session; leave one out" in capsys.readouterr().err


def test_the_entry_gives_the_session_and_every_line_is_sent_under_its_served_name(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    catalog = _catalog(tmp_path)
    for model in (["--model", "tiny"], []):  # named, or the default
        args = build_parser().parse_args(["batch", "in.jsonl", "-o", "o.jsonl", "--catalog", str(catalog), *model])
        session = _session_config(args)
        assert session.model.path == DEFAULT_MODEL and session.model.served_name == "tiny-llama"
        assert _batch_config(args, args.input, args.output).rewrite_model_to_served_name
    plain = build_parser().parse_args(["batch", "in.jsonl", "-o", "o.jsonl", "--model", "m.gguf", "--catalog", ""])
    assert _session_config(plain).model.path == tmp_path / "m.gguf"
    assert not _batch_config(plain, plain.input, plain.output).rewrite_model_to_served_name


def test_embeddings_lines_for_vllm_exit_2_naming_the_field(tmp_path: Path):
    src = tmp_path / "in.jsonl"
    lines = [
        {"custom_id": "c", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}},
        {"custom_id": "e", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}},
    ]
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "python").symlink_to(sys.executable)
    session = {"engine": {"kind": "vllm", "venv": "venv"}, "model": {"path": "ckpt"}, "runs_dir": "runs"}
    config = tmp_path / "vllm.json"
    config.write_text(json.dumps({"session": session}))
    proc, _ = _run(["batch", str(src), "-o", str(tmp_path / "out.jsonl"), "--config", str(config)])
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(
        f"llmflow batch: session.engine.embeddings: line 2 of {src} is a /v1/embeddings request, but vLLM serves"
    )
    assert not (tmp_path / "runs").exists()
