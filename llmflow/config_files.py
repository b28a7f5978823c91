"""Settings files, read one way everywhere: campaign files, model catalogs and ``--config`` files.

A file is parsed by its suffix (``.toml``, ``.json``, else YAML) and its relative paths are
taken from its own folder (``llmflow.paths``). Errors are ``ConfigError``s naming the file (and
the field), so a caller turns them into exit 2 or an HTTP 400 without a traceback.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from llmflow import paths
from llmflow.errors import ConfigError
from llmflow.validation import did_you_mean

Format = Literal["toml", "json", "yaml"]
CONFIG_SECTIONS = ("session", "batch")


def file_format(path: Path) -> Format:
    """``toml`` for ``.toml``, ``json`` for ``.json``, else ``yaml`` (``.yaml``, ``.yml``)."""
    suffix = path.suffix.lower()
    return "toml" if suffix == ".toml" else "json" if suffix == ".json" else "yaml"


def _parse(text: str, fmt: Format) -> Any:
    """``text`` parsed as ``fmt``; ``ValueError`` when it is not. YAML is imported only for a
    YAML file: the command line's start-up stays fast."""
    if fmt == "toml":
        return tomllib.loads(text)
    if fmt == "json":
        return json.loads(text)
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(str(exc)) from None


def read_table(
    path: Path,
    label: str,
    error: type[ConfigError] = ConfigError,
    fmt: Format | None = None,
    top: str = "a table of settings",
) -> dict[str, Any]:
    """The file at ``path`` as a table, parsed as ``fmt`` (default: by its suffix). Raises
    ``error`` as ``"<label> <path>: ..."`` when it cannot be read, parsed, or is not a table
    (``top`` says what was expected)."""
    fmt = fmt or file_format(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise error(f"{label} {path}: {exc.strerror}") from None
    try:
        data = _parse(text, fmt)
    except ValueError as exc:
        raise error(f"{label} {path}: not valid {fmt.upper()}: {exc}") from None
    if not isinstance(data, dict):
        raise error(f"{label} {path}: expected {top} at the top")
    return data


def load_config_file(path: Path, label: str = "--config") -> dict[str, Any]:
    """A ``--config`` file (JSON): a table with ``session`` and/or ``batch``, their relative paths
    taken from the file's folder. Anything else at the top (a typo such as ``sesion``) is refused,
    as unknown keys are at every other level."""
    data = read_table(path, label, fmt="json", top='{"session": {...}, "batch": {...}}')
    for key in data:
        if key not in CONFIG_SECTIONS:
            hint = did_you_mean(key, CONFIG_SECTIONS) or f" (expected {' or '.join(CONFIG_SECTIONS)})"
            raise ConfigError(f"{label} {path}: unknown top-level key {key!r}{hint}")
        if not isinstance(data[key], dict):
            raise ConfigError(f"{label} {path}: {key}: expected a table")
    base = Path(path).resolve().parent
    return {
        **({"session": paths.resolve_session(data["session"], base)} if "session" in data else {}),
        **({"batch": paths.resolve_batch(data["batch"], base)} if "batch" in data else {}),
    }
