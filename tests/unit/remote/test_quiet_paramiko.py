"""paramiko's own ERROR records (a forward's channel refused while a server starts) stay out of
the log unless debugging: a normal Slurm start used to print them, a requeue storm 444 times."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator

import paramiko
import pytest

from llmflow.remote.shell import quiet_paramiko
from llmflow.remote.tunnel import LocalForward

REFUSED = "Secsh channel 0 open FAILED: Connection refused: Connect failed"


class _Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)  # what a console shows
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def shown() -> Iterator[list[str]]:
    """Messages at WARNING or above that reach a handler on the root logger."""
    handler, paramiko_logger = _Kept(), logging.getLogger("paramiko")
    before = paramiko_logger.level
    logging.getLogger().addHandler(handler)
    try:
        yield handler.messages
    finally:
        logging.getLogger().removeHandler(handler)
        paramiko_logger.setLevel(before)


def test_paramiko_errors_are_not_shown_by_default(shown: list[str], monkeypatch):
    monkeypatch.delenv("LLMFLOW_DEBUG", raising=False)
    quiet_paramiko()
    logging.getLogger("paramiko.transport").error(REFUSED)
    logging.getLogger("llmflow.test").warning("ours still shows")
    assert shown == ["ours still shows"]


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_paramiko_errors_are_shown_when_debugging(shown: list[str], monkeypatch, how: str):
    quiet_paramiko(False)
    if how == "argument":
        quiet_paramiko(True)
    else:
        monkeypatch.setenv("LLMFLOW_DEBUG", "1")
        quiet_paramiko()
    logging.getLogger("paramiko.transport").error(REFUSED)
    assert shown == [REFUSED]


class _RefusingTransport:
    """A transport whose far side refuses every forward: the server's port is not open yet."""

    def __init__(self) -> None:
        self.opened = 0

    def open_channel(self, *args, **kwargs):
        self.opened += 1
        raise paramiko.ChannelException(2, "Connect failed")


def test_a_refused_forward_is_not_a_warning_or_a_retry(shown: list[str]):
    """Our own forward used to add a WARNING (and a second refused channel) for each refusal."""
    transport = _RefusingTransport()
    forward = LocalForward(lambda: transport, "node1", 8000)
    try:
        with socket.create_connection(forward.bind_address, timeout=5) as client:
            assert client.recv(1) == b""  # closed: the client sees what a refused port looks like
    finally:
        forward.close()
    assert transport.opened == 1
    assert shown == []
