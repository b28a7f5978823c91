"""Where a relative path points: one rule, applied before anything starts.

- In a config file (``--config`` JSON, a campaign file): relative to **that file's folder**, so
  a file means the same thing whatever folder a command, cron job or worker runs in.
- On the command line (input, ``-o``, ``--model``, ``--venv``): relative to the working directory.
- In flow parameters (the UI's forms, Python) and blocks: relative to the flow process's working
  directory (the repository root for the shipped deployments).
- Paths on a remote host (engine and model with the slurm or ssh placement): relative to the
  login's home folder there, as ``ssh host cmd`` takes them; they are never resolved here.

Nothing may be resolved against a run folder: the server starts there, and a relative
``engine.venv`` used to point into ``runs/<id>/``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

# an unresolved vLLM model may be a Hugging Face repository id, which vLLM loads by name
HF_MODEL_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
LOGIN_PATHS = ("key_file", "ssh_config", "known_hosts")
LOCAL_ENGINE_PATHS = ("venv", "binary")


def absolute(value: Any, base: Path) -> Any:
    """``value`` as an absolute path string under ``base`` when it is a relative path; ``~`` is
    expanded; anything else (absolute, empty, not a string) is returned unchanged."""
    if not isinstance(value, (str, Path)) or not str(value):
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else base / path)


def is_model_name(value: str) -> bool:
    """True when ``value`` reads as a Hugging Face id (``org/name``) rather than a path."""
    return bool(HF_MODEL_ID.match(value)) and not value.startswith((".", "~"))


def _model_path(value: Any, base: Path, engine_kind: str) -> Any:
    """A local model path made absolute, except a vLLM model name that is not a folder under ``base``."""
    if engine_kind == "vllm" and isinstance(value, str) and is_model_name(value) and not (base / value).exists():
        return value
    return absolute(value, base)


def _with(data: dict[str, Any], key: str, fn: Any) -> None:
    if key in data and data[key] is not None:
        data[key] = fn(data[key])


def resolve_session(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """A copy of a session table (as read from a file) with its paths on this machine made
    absolute under ``base``; the engine's and model's paths only for the local placement."""
    out = {**data}
    _with(out, "runs_dir", lambda v: absolute(v, base))
    _with(out, "api_key_file", lambda v: absolute(v, base))
    placement = out.get("placement")
    local = not isinstance(placement, dict) or placement.get("kind", "local") == "local"
    if isinstance(placement, dict):
        placement = out["placement"] = {**placement}
        logins = [placement.get("login")] + list(placement.get("hosts") or [])
        resolved = [
            {**x, **{k: absolute(x[k], base) for k in LOGIN_PATHS if k in x}} if isinstance(x, dict) else x
            for x in logins
        ]
        if placement.get("login") is not None:
            placement["login"] = resolved[0]
        if "hosts" in placement and isinstance(placement["hosts"], list):
            placement["hosts"] = resolved[1:]
    engine = out.get("engine")
    engine_kind = engine.get("kind", "llama_cpp") if isinstance(engine, dict) else "llama_cpp"
    if local and isinstance(engine, dict):
        out["engine"] = {**engine, **{k: absolute(engine[k], base) for k in LOCAL_ENGINE_PATHS if k in engine}}
    if local and isinstance(out.get("model"), dict) and "path" in out["model"]:
        out["model"] = {**out["model"], "path": _model_path(out["model"]["path"], base, engine_kind)}
    return out


def resolve_batch(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """A copy of a batch table with ``input_path`` and ``output_path`` absolute under ``base``."""
    out = {**data}
    for key in ("input_path", "output_path"):
        _with(out, key, lambda v: absolute(v, base))
    return out


def local_server_paths(config: Any, base: Path | None = None) -> Any:
    """A ``SessionConfig`` whose engine and model paths are absolute (under ``base``, default the
    working directory): the local placement starts the server in its run folder, where a
    relative path would point somewhere else."""
    base = base or Path.cwd()
    engine = config.engine
    engine = engine.model_copy(
        update={k: Path(absolute(getattr(engine, k), base)) for k in LOCAL_ENGINE_PATHS if hasattr(engine, k)}
    )
    model = config.model.model_copy(update={"path": Path(_model_path(str(config.model.path), base, engine.kind))})
    return config.model_copy(update={"engine": engine, "model": model})
