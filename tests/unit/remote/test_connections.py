"""Which forward a login gets: pure choice, no connection made."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from llmflow.config import SSHLogin
from llmflow.remote.connections import uses_openssh


def test_auto_uses_openssh_when_ssh_is_on_path(monkeypatch, tmp_path):
    login = SSHLogin(host="h")
    monkeypatch.setenv("PATH", str(tmp_path))  # no ssh here
    assert not uses_openssh(login)
    (tmp_path / "ssh").write_text("#!/bin/sh\n")
    (tmp_path / "ssh").chmod(0o755)
    assert uses_openssh(login)
    assert not uses_openssh(SSHLogin(host="h", forward="paramiko"))
    assert uses_openssh(SSHLogin(host="h", forward="openssh"))


def test_an_unknown_forward_names_the_field():
    with pytest.raises(ValidationError, match="forward"):
        SSHLogin(host="h", forward="putty")
