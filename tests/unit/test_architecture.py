"""The shape of the code: the core library's imports, its public API, lint and format.

The core library (``llmflow``) is below the application (``flows``, ``tasks``, ``blocks``,
``cli``, ``deployments``): it must import none of them, and no module of it may import
itself back through others. The node-side supervisor runs under the model server's own
Python, so it may import the standard library only.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import llmflow
from llmflow.config import PROJECT_ROOT

CORE = PROJECT_ROOT / "llmflow"
APPLICATION = ("flows", "tasks", "blocks", "cli", "deployments", "api")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every module ``path`` imports (at the top or inside functions; not under TYPE_CHECKING),
    with ``from pkg import sub`` resolved to the submodule when it is one."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return found


def _graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in CORE.rglob("*.py")}
    return {name: _imports(path, set(paths)) for name, path in paths.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle among the core modules, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node] & graph.keys()):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_core_library_has_no_import_cycle():
    assert _cycle(_graph()) is None, " -> ".join(_cycle(_graph()) or [])


def test_the_cycle_check_can_fail():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_core_library_imports_no_application_module():
    offenders = {
        module: sorted(i for i in imported if i.split(".")[0] in APPLICATION) for module, imported in _graph().items()
    }
    assert {m: i for m, i in offenders.items() if i} == {}


def test_the_supervisor_imports_the_standard_library_only():
    imported = {name.split(".")[0] for name in _imports(CORE / "remote" / "supervisor.py", set())}
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported


def test_public_api_of_the_core_package():
    """What ``import llmflow`` offers; a change here is a change for every user of the library."""
    assert sorted(llmflow.__all__) == [
        "Allocation",
        "BatchConfig",
        "BatchReport",
        "CampaignConfig",
        "CampaignResult",
        "CellResult",
        "ConfigError",
        "LLMFlowError",
        "ModelConfig",
        "PermanentError",
        "Ready",
        "ServerDied",
        "ServerHandle",
        "SessionConfig",
        "Teardown",
        "TokPS",
        "Tunnel",
        "__version__",
    ]
    for name in llmflow.__all__:
        assert getattr(llmflow, name) is not None


def test_lint_and_format():
    """ruff's lint rules and formatter (pyproject.toml) hold for the whole tree."""
    ruff = Path(sys.executable).with_name("ruff")
    for args in (["check", "."], ["format", "--check", "."]):
        proc = subprocess.run([str(ruff), *args], cwd=PROJECT_ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
