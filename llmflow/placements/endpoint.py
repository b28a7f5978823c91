"""Endpoint placement: a server someone else already runs (a team gateway, a colleague's job).

The session still allocates a run folder, gates and measures, but it starts nothing and so
tears down nothing: the server is the same after the run as before it.
"""

from __future__ import annotations

import socket
from datetime import UTC, datetime
from urllib.parse import urlsplit

from llmflow.placements.base import PLACEMENTS, Driver, make_run_dir, write_secret
from llmflow.results import Allocation, ServerHandle, Teardown, Tunnel


@PLACEMENTS.register("endpoint")
class EndpointDriver(Driver):
    kind = "endpoint"

    def allocate(self, run_id: str, flow_run_id: str | None = None) -> Allocation:
        return Allocation(
            placement=self.kind,
            run_id=run_id,
            node=urlsplit(self.placement.base_url).hostname or "",
            run_dir=make_run_dir(self.config.runs_dir, run_id),
            started_at=datetime.now(UTC),
        )

    def warm(self, alloc: Allocation, flow_run_id: str | None = None) -> ServerHandle:
        """No start: describe the server, and keep its key in the run folder's 0600 file like ours."""
        url = urlsplit(self.placement.base_url)
        key_file = None
        if self.placement.api_key is not None:
            key_file = alloc.run_dir / "api_key"
            write_secret(key_file, self.placement.api_key.get_secret_value())
        return ServerHandle(
            engine=self.config.engine.kind,
            run_id=alloc.run_id,
            node=url.hostname or socket.gethostname(),
            host=url.hostname or "",
            port=url.port or (443 if url.scheme == "https" else 80),
            api_key_file=key_file,
            served_name=self.config.model.served_name,
        )

    def tunnel(self, handle: ServerHandle) -> Tunnel:
        return Tunnel(base_url=self.placement.base_url.rstrip("/"), local_port=handle.port, forwarded=False)

    def check_alive(self, handle: ServerHandle) -> None:
        """We cannot see its process; the gate's deadline and the client's retries cover it."""

    def recover(self, alloc: Allocation, handle: ServerHandle) -> tuple[ServerHandle, Tunnel] | None:
        return None

    def teardown(self, alloc: Allocation) -> Teardown:
        return Teardown(run_id=alloc.run_id, not_ours=True, released_at=datetime.now(UTC))
