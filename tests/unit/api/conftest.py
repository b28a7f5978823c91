"""One real API service per test module: the app on uvicorn, on a free 127.0.0.1 port, in a
background thread, without the supervisor (batches stay as created), state in a temp folder.
Tests talk to it with the official OpenAI SDK, as users do."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from sqlalchemy import update

from api import keys
from api.app import create_app
from api.db import BatchRow, create_tables, make_engine, sessions
from api.settings import ApiSettings

MAX_FILE_BYTES = 256 * 1024


@dataclass
class Service:
    url: str
    settings: ApiSettings

    def _db(self, work):
        async def go():
            engine = make_engine(self.settings.db_url)
            try:
                await create_tables(engine)
                async with sessions(engine)() as session:
                    return await work(session)
            finally:
                await engine.dispose()

        return asyncio.run(go())

    def new_key(self, name: str = "test") -> tuple[str, str]:
        """A fresh key: (its id, its secret)."""
        row, secret = self._db(lambda s: keys.create_key(s, name))
        return row.id, secret

    def revoke(self, key_id: str) -> None:
        self._db(lambda s: keys.revoke_key(s, key_id))

    def set_status(self, batch_id: str, status: str) -> None:
        """What the supervisor would do."""

        async def work(session):
            await session.execute(update(BatchRow).where(BatchRow.id == batch_id).values(status=status))
            await session.commit()

        self._db(work)

    def client(self, secret: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=secret, max_retries=0, timeout=20)

    def http(self, secret: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=20)

    def files_on_disk(self) -> list[str]:
        return sorted(p.name for p in self.settings.files_dir.iterdir())


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    data = tmp_path_factory.mktemp("api")
    settings = ApiSettings(
        data_dir=data,
        database_url=None,
        max_file_bytes=MAX_FILE_BYTES,
        min_completion_window="1h",
        max_completion_window="7d",
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(settings, supervise=False), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the API service did not start"
        time.sleep(0.02)
    try:
        yield Service(url=f"http://127.0.0.1:{port}", settings=settings)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture
def key(service: Service) -> str:
    """A fresh key's secret: each test sees only what it made."""
    return service.new_key()[1]


@pytest.fixture
def client(service: Service, key: str) -> openai.OpenAI:
    return service.client(key)


def write_jsonl(path: Path, lines: int = 3, endpoint: str = "/v1/chat/completions") -> Path:
    import json

    with path.open("w") as f:
        for i in range(lines):
            body = {"model": "tiny", "messages": [{"role": "user", "content": f"hello {i}"}]}
            f.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": endpoint, "body": body}) + "\n")
    return path
