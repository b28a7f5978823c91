"""Hold a model session open for interactive use (an app, a notebook, curl) for some hours.

Allocate, warm, tunnel and gate as every flow does, announce the local base URL, then watch:
every ``check_every_s`` the job/process must be alive and the endpoint must answer through the
tunnel; after a requeue the session follows the job to its new node and port (the local URL
stays the same for SSH tunnels). Tears down when the hours are up, on Ctrl-C or cancellation.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

from prefect import flow, get_run_logger

from flows.session import Session, model_session, release_session
from llmflow.config import SessionConfig
from llmflow.placements import driver_for
from llmflow.readiness import answers
from tasks import recover_session

_announcers: list[Callable[[Session], None]] = []


def on_ready(fn: Callable[[Session], None]) -> None:
    """Register a callback (the CLI's printer) for when the session is ready; process-local."""
    _announcers.append(fn)


def connection_help(s: Session) -> str:
    """What a person needs to use the server: URL, key, and two ready-to-paste examples."""
    key = s.handle.api_key() or "none"
    base = s.tunnel.base_url
    return "\n".join(
        [
            f"base URL:  {base}/v1",
            f"API key:   {key}",
            f"model:     {s.handle.served_name}",
            "",
            "curl:",
            f"  curl -s {base}/v1/completions -H 'Authorization: Bearer {key}' "
            f'-H \'Content-Type: application/json\' -d \'{{"model": "{s.handle.served_name}", "prompt": "Hello", "max_tokens": 16}}\'',
            "",
            "python (openai):",
            "  from openai import OpenAI",
            f'  client = OpenAI(base_url="{base}/v1", api_key="{key}")',
            f'  print(client.completions.create(model="{s.handle.served_name}", prompt="Hello", max_tokens=16))',
        ]
    )


@flow(name="hold-session", on_crashed=[release_session], on_cancellation=[release_session])
def hold_session(session: SessionConfig = SessionConfig(), hours: float = 1.0, check_every_s: float = 30.0) -> float:
    """Keep a ready, reachable model server for ``hours``; returns the hours it was held."""
    logger = get_run_logger()
    started = time.monotonic()
    with model_session(session) as s:
        logger.info("session ready at %s/v1 (API key in %s)", s.tunnel.base_url, s.handle.api_key_file)
        for announce in list(_announcers):
            announce(s)
        driver = driver_for(session)
        while time.monotonic() - started < hours * 3600:
            time.sleep(min(check_every_s, max(0.0, hours * 3600 - (time.monotonic() - started))))
            driver.check_alive(s.handle)
            if answers(s.tunnel.base_url, s.handle, session.engine):
                continue
            moved = recover_session(session, s.allocation, s.handle)
            if moved is not None:
                handle, tunnel, ready = moved
                s = replace(s, handle=handle, tunnel=tunnel, ready=ready)
                logger.warning(
                    "job ran again on %s:%d; the session goes on at %s", handle.node, handle.port, tunnel.base_url
                )
                for announce in list(_announcers):
                    announce(s)
            else:
                logger.warning("the endpoint did not answer a health check; will check again")
    return round((time.monotonic() - started) / 3600, 4)
