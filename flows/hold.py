"""Hold a model session open for interactive use (an app, a notebook, curl) for some hours.

Allocate, warm, tunnel and gate as every flow does, announce the local base URL, then watch:
every ``check_every_s`` the job/process must be alive and the endpoint must answer through the
tunnel; after a requeue the session follows the job to its new node and port (the local URL
stays the same for SSH tunnels). Tears down when the hours are up, on Ctrl-C or cancellation.

With ``session.replicas`` > 1 the held URL is nginx's (``llmflow.gateway``) in front of the
replicas: it is announced once the first replica is ready, the others join as they pass their
gates, and a lost replica leaves nginx's upstream at once and is replaced in the background.

Ctrl-C is the documented way to end a hold early: once everything is torn down the run ends
Completed, named "Ended early" (not Crashed, which would say something went wrong), and
returns ``Held(interrupted=True)`` so the command line can say so.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from prefect import flow, get_run_logger
from prefect.runtime import flow_run as current_flow_run
from prefect.states import Completed, State
from pydantic import BaseModel

from flows.replicas import replica_set
from flows.session import model_session, release_session
from llmflow.config import SessionConfig
from llmflow.errors import ServerDied
from llmflow.gateway import Gateway, find_nginx
from llmflow.placements import driver_for
from llmflow.readiness import answers
from tasks import recover_session

ENDED_EARLY_STATE = "Ended early"  # a Completed state's name, shown in the UI


class Held(BaseModel):
    """What a hold returns: the hours it held, and whether Ctrl-C ended it before its time."""

    hours: float
    interrupted: bool = False


@dataclass(frozen=True)
class Reach:
    """How a person reaches a held session: its one server, or the gateway in front of its replicas."""

    base_url: str
    api_key: str | None
    served_name: str
    replicas: int = 1


_announcers: list[Callable[[Reach], None]] = []


def on_ready(fn: Callable[[Reach], None]) -> None:
    """Register a callback (the CLI's printer) for when the session is ready; process-local."""
    _announcers.append(fn)


def _announce(reach: Reach) -> None:
    for announce in list(_announcers):
        announce(reach)


def connection_help(r: Reach) -> str:
    """What a person needs to use the server: URL, key, and two ready-to-paste examples."""
    key = r.api_key or "none"
    base = r.base_url
    name = r.served_name
    return "\n".join(
        [
            f"base URL:  {base}/v1" + (f"  (nginx in front of {r.replicas} replicas)" if r.replicas > 1 else ""),
            f"API key:   {key}",
            f"model:     {name}",
            "",
            "curl:",
            f"  curl -s {base}/v1/completions -H 'Authorization: Bearer {key}' "
            f'-H \'Content-Type: application/json\' -d \'{{"model": "{name}", "prompt": "Hello", "max_tokens": 16}}\'',
            "",
            "python (openai):",
            "  from openai import OpenAI",
            f'  client = OpenAI(base_url="{base}/v1", api_key="{key}")',
            f'  print(client.completions.create(model="{name}", prompt="Hello", max_tokens=16))',
        ]
    )


def _hours_since(started: float) -> float:
    return round((time.monotonic() - started) / 3600, 4)


@flow(name="hold-session", on_crashed=[release_session], on_cancellation=[release_session])
def hold_session(
    session: SessionConfig = SessionConfig(), hours: float = 1.0, check_every_s: float = 30.0
) -> Held | State:
    """Keep a ready, reachable model server for ``hours``; returns the hours it was held.

    Ctrl-C (KeyboardInterrupt in the flow's thread) ends it early: the sessions' ``finally``
    blocks tear everything down on the way out, then the run ends Completed ("Ended early").
    Cancellation from the UI or API is Prefect's own signal and still ends the run Cancelled.
    """
    started = time.monotonic()
    try:
        if session.replicas > 1:
            _hold_replicas(session, hours, check_every_s)
        else:
            _hold_one(session, hours, check_every_s)
    except KeyboardInterrupt:
        held = Held(hours=_hours_since(started), interrupted=True)
        message = f"Ctrl-C ended the hold after {held.hours} h; everything was torn down"
        get_run_logger().warning(message)
        return Completed(name=ENDED_EARLY_STATE, message=message, data=held)
    return Held(hours=_hours_since(started))


def _hold_one(session: SessionConfig, hours: float, check_every_s: float) -> None:
    """One server for ``hours``: check it every ``check_every_s``, follow it after a requeue."""
    logger = get_run_logger()
    started = time.monotonic()
    with model_session(session) as s:
        logger.info("session ready at %s/v1 (API key in %s)", s.tunnel.base_url, s.handle.api_key_file)
        _announce(Reach(s.tunnel.base_url, s.handle.api_key(), s.handle.served_name))
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
                _announce(Reach(s.tunnel.base_url, s.handle.api_key(), s.handle.served_name))
            else:
                logger.warning("the endpoint did not answer a health check; will check again")


def _hold_replicas(session: SessionConfig, hours: float, check_every_s: float) -> None:
    """Replicas behind nginx for ``hours``: announce the URL once one replica is ready."""
    logger = get_run_logger()
    started = time.monotonic()
    find_nginx()  # before any replica is started
    with replica_set(session) as replicas:
        with Gateway(replicas.run_dir, f"{replicas.set_id}-gateway", current_flow_run.get_id()).start() as gateway:
            replicas.on_change(gateway.update)
            replicas.watch(check_every_s)
            replicas.wait_ready(1)
            logger.info("gateway ready at %s/v1 in front of %d replicas", gateway.base_url, session.replicas)
            _announce(Reach(gateway.base_url, replicas.api_key(), session.model.served_name, session.replicas))
            while time.monotonic() - started < hours * 3600:
                time.sleep(min(1.0, max(0.0, hours * 3600 - (time.monotonic() - started))))
                if replicas.gave_up:
                    raise ServerDied(replicas.gave_up)
