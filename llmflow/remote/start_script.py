"""The script that starts a server on a remote host (a Slurm job or an SSH host), as text.

Pure: the same lines serve the Slurm job script (after its ``#SBATCH`` header) and the SSH
placement's start script, so both start the server the same way: read the API key and the
engine's secrets from the run folder's mode-0600 files into the environment (never onto a
command line), run the
user's setup lines as written, write this project's standard-library supervisor from an
embedded quoted here-document (nothing of the project is installed on the host), and exec it.
"""

from __future__ import annotations

import shlex
from pathlib import Path

LAUNCHER_DELIMITER = "LLMFLOW_NODE_LAUNCHER"
HEARTBEAT_FILE = "heartbeat"  # in the run folder; the flow rewrites it, the supervisor watches it
SECRET_ENV_FILE = "secret_env"  # in the run folder: engine.secret_env's values (llmflow.secret_env)
SUPERVISOR = Path(__file__).resolve().parent / "supervisor.py"  # runs on the node: standard library only


def launcher_source() -> str:
    return SUPERVISOR.read_text()


def supervisor_argv(
    *,
    run_dir: str,
    server_python: str,
    bind_host: str,
    registry_file: str | None = None,
    lease_ttl_s: float | None = None,
    endpoint_file: str | None = None,
) -> list[str]:
    """The supervisor's command line up to (not including) ``--`` and the server's argv."""
    return [
        server_python,
        f"{run_dir}/supervisor.py",
        "--endpoint-file",
        endpoint_file or f"{run_dir}/endpoint.json",
        *(["--registry-file", registry_file] if registry_file else []),
        *(
            ["--heartbeat-file", f"{run_dir}/{HEARTBEAT_FILE}", "--lease-ttl", f"{lease_ttl_s:g}"]
            + ["--secrets-file", f"{run_dir}/{SECRET_ENV_FILE}"]
            if lease_ttl_s
            else []
        ),
        "--host",
        bind_host,
    ]


def preamble_lines(
    *,
    run_dir: str,
    setup: list[str],
    launcher_source: str,
    api_key_env: str | None,
    registry_file: str | None = None,
) -> list[str]:
    """Everything before the supervisor starts: the key and secrets into the environment, the
    setup lines, and the supervisor's source written into the run folder."""
    q = shlex.quote
    return [
        "set -eo pipefail",
        f"cd {q(run_dir)}",
        "rm -f endpoint.json  # a restarted (requeued) server writes a fresh one",
        *([f"mkdir -p {q(registry_file.rsplit('/', 1)[0])}"] if registry_file and "/" in registry_file else []),
        *([f'if [ -f api_key ]; then {api_key_env}="$(cat api_key)"; export {api_key_env}; fi'] if api_key_env else []),
        f"if [ -f {SECRET_ENV_FILE} ]; then set -a; . ./{SECRET_ENV_FILE}; set +a; fi  # engine.secret_env (0600)",
        "cd ~  # setup lines, engine and model paths: relative ones are taken from the home folder",
        "# --- setup lines from the engine config ---",
        *setup,
        "# --- end of setup lines ---",
        f"cat > {q(run_dir + '/supervisor.py')} <<'{LAUNCHER_DELIMITER}'",
        launcher_source.rstrip("\n"),
        LAUNCHER_DELIMITER,
    ]


def server_start_lines(
    *,
    run_dir: str,
    setup: list[str],
    server_python: str,
    server_argv: list[str],
    bind_host: str,
    launcher_source: str,
    api_key_env: str | None,
    registry_file: str | None = None,
    lease_ttl_s: float | None = None,
) -> list[str]:
    """Body lines of the start script; the supervisor writes ``endpoint.json`` in ``run_dir``
    and, given ``registry_file``, keeps the replica's record with its state there too. Given
    ``lease_ttl_s``, it stops the server once ``run_dir/heartbeat`` stops changing for that long
    (``remote.heartbeat`` renews it)."""
    supervisor = supervisor_argv(
        run_dir=run_dir,
        server_python=server_python,
        bind_host=bind_host,
        registry_file=registry_file,
        lease_ttl_s=lease_ttl_s,
    )
    preamble = preamble_lines(
        run_dir=run_dir,
        setup=setup,
        launcher_source=launcher_source,
        api_key_env=api_key_env,
        registry_file=registry_file,
    )
    return [*preamble, f"exec {shlex.join([*supervisor, '--', *server_argv])}"]
