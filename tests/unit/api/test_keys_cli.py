"""`llmflow api keys create|list|revoke` and the pure parts of keys.py; the keys commands do
not import Prefect (they are meant to answer at once)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from api import keys
from cli.main import build_parser, main
from llmflow.config import PROJECT_ROOT


def test_a_secret_is_prefixed_random_and_stored_only_as_its_digest():
    a, b = keys.new_secret(), keys.new_secret()
    assert a != b and a.startswith("llmflow-") and len(a) >= len("llmflow-") + 43
    assert keys.digest(a) == keys.digest(a) and len(keys.digest(a)) == 64 and a not in keys.digest(a)
    assert keys.display_prefix(a) == a[:14]
    assert a[10:-4] not in keys.masked(a)


def test_create_list_revoke(tmp_path: Path, capsys):
    data = ["--data-dir", str(tmp_path)]
    assert main(["api", "keys", "create", "alice", *data]) == 0
    created = capsys.readouterr().out.splitlines()
    key_id, secret = created[0].split()[1], created[1]
    assert key_id.startswith("key_") and secret.startswith("llmflow-")

    assert main(["api", "keys", "list", *data]) == 0
    listed = capsys.readouterr().out
    assert key_id in listed and "alice" in listed and secret[:14] in listed and secret not in listed

    assert main(["api", "keys", "revoke", key_id, *data]) == 0
    assert "revoked" in capsys.readouterr().out
    assert main(["api", "keys", "list", *data]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if key_id in line)
    assert not row.rstrip().endswith("-")  # the REVOKED column has a time

    assert main(["api", "keys", "revoke", "key_nope", *data]) == 1
    assert "no key" in capsys.readouterr().err
    assert main(["api", "keys", "create", " ", *data]) == 2


def test_serve_flags_override_the_environment(tmp_path: Path, monkeypatch):
    from cli.api import settings_from

    monkeypatch.setenv("LLMFLOW_API_PORT", "9000")
    monkeypatch.setenv("LLMFLOW_API_DEPLOYMENT", "from-env/x")
    args = build_parser().parse_args(["api", "serve", "--port", "9100", "--data-dir", str(tmp_path)])
    settings = settings_from(args)
    assert (settings.port, settings.deployment, settings.data_dir) == (9100, "from-env/x", tmp_path)
    assert main(["api", "serve", "--port", "0"]) == 2  # refused before anything starts


def test_the_keys_commands_do_not_import_prefect(tmp_path: Path):
    code = (
        "import sys; from cli.main import main; "
        f"assert main(['api', 'keys', 'create', 'x', '--data-dir', {str(tmp_path)!r}]) == 0; "
        "assert not [m for m in sys.modules if m.split('.')[0] == 'prefect'], 'prefect was imported'"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMFLOW_API_")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
