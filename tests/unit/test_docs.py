"""What the docs show works: every `llmflow` command line in them parses, and every config
example in the README validates under the same rules as `--config` (paths from the file's folder)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from cli.main import _config_file, build_parser
from llmflow.config import PROJECT_ROOT, BatchConfig, SessionConfig

DOCS = [
    PROJECT_ROOT / "README.md",
    PROJECT_ROOT / "deployments" / "README.md",
    *sorted((PROJECT_ROOT / "docs").glob("*.md")),
]
FENCE = re.compile(r"```(\w*)\n(.*?)```", re.S)
COMMAND = re.compile(r"^(?:\.venv/bin/)?llmflow\s+(.*)$")


def commands(text: str) -> list[str]:
    """`llmflow ...` lines of shell blocks and inline code spans, without trailing comments."""
    found = []
    for lang, body in FENCE.findall(text):
        if lang in ("bash", "sh", "shell", "console"):
            found += [line.split("  #")[0].strip() for line in body.splitlines()]
    found += re.findall(r"`([^`\n]+)`", FENCE.sub("", text))
    return [m.group(1) for line in found if (m := COMMAND.match(line.strip()))]


SCRIPTS = [PROJECT_ROOT / "Makefile", *sorted((PROJECT_ROOT / "scripts").glob("*.sh"))]


def script_commands(text: str) -> list[str]:
    """`.venv/bin/llmflow ...` lines of the Makefile and shell scripts."""
    return [m.group(1) for line in text.splitlines() if (m := re.search(r"\.venv/bin/llmflow\s+([^#;&|]*)", line))]


def doc_commands() -> list[tuple[str, str]]:
    rows = [(doc.relative_to(PROJECT_ROOT).as_posix(), cmd) for doc in DOCS for cmd in commands(doc.read_text())]
    rows += [(f.relative_to(PROJECT_ROOT).as_posix(), cmd) for f in SCRIPTS for cmd in script_commands(f.read_text())]
    return rows


def test_the_docs_show_commands_at_all():
    shown = {cmd.split()[0] for _, cmd in doc_commands()}
    assert {"batch", "hold", "bench", "cleanup", "server", "make-model", "demo"} <= shown


SUBCOMMANDS = set(build_parser()._subparsers._group_actions[0].choices)  # noqa: SLF001


@pytest.mark.parametrize(("doc", "command"), doc_commands())
def test_every_command_line_in_the_docs_parses(doc, command):
    if command in SUBCOMMANDS:  # prose naming a command (`llmflow batch`), not a command line
        return
    try:
        build_parser().parse_args(shlex.split(command))
    except SystemExit as exc:  # --help exits 0; a flag that does not exist exits 2
        assert exc.code == 0, f"{doc}: llmflow {command}"


def readme_configs() -> list[str]:
    return [body for lang, body in FENCE.findall((PROJECT_ROOT / "README.md").read_text()) if lang == "json"]


def test_every_json_example_in_the_readme_validates(tmp_path: Path):
    """Full configs (`{"session": ...}`) as `--config` files; fragments (an engine table) in a session."""
    checked = 0
    for i, body in enumerate(readme_configs()):
        data = json.loads(body if body.lstrip().startswith("{") else "{" + body + "}")  # a '"engine": {...}' excerpt
        if not {"session", "batch"} & set(data):
            data = {"session": {"engine": data["engine"]}} if "engine" in data else {"session": data}
        path = tmp_path / f"example{i}.json"
        path.write_text(json.dumps(data))
        loaded = _config_file(path)
        SessionConfig.model_validate(loaded.get("session", {}))
        BatchConfig.model_validate({**loaded.get("batch", {})})
        checked += 1
    assert checked >= 5
