"""Which CPUs the local placement's server and the orchestrator get (``server_cpus``)."""

from __future__ import annotations

import logging
import os

import pytest
from pydantic import ValidationError

from llmflow.config import LocalPlacement
from llmflow.errors import ConfigError
from llmflow.placements import cpus


def test_cpu_lists_round_trip_the_kernels_form():
    assert cpus.cpu_list([5, 0, 1, 2, 3]) == "0-3,5"
    assert cpus.cpu_list([1]) == "1" and cpus.cpu_list([]) == ""
    assert cpus.parse_cpu_list("0-3,5\n") == {0, 1, 2, 3, 5}
    assert cpus.parse_cpu_list(cpus.cpu_list({0, 2, 3, 7})) == {0, 2, 3, 7}
    assert cpus.allowed_cpus(os.getpid()) == os.sched_getaffinity(0)


def test_the_orchestrator_gets_the_rest_or_stays_where_it_is():
    assert cpus.orchestrator_cpus({1}, {0, 1}) == {0}
    assert cpus.orchestrator_cpus({2, 3}, {0, 1, 2, 3}) == {0, 1}
    assert cpus.orchestrator_cpus({0, 1}, {0, 1}) is None  # nothing left: not moved


def test_server_cpus_must_exist_and_the_error_names_the_field():
    assert cpus.check_server_cpus([1], {0, 1}) == {1}
    with pytest.raises(ConfigError, match=r"placement\.server_cpus: CPU 2,7 .* may use 0-1"):
        cpus.check_server_cpus([1, 2, 7], {0, 1})


def test_the_setting_is_optional_distinct_and_not_negative():
    assert LocalPlacement().server_cpus is None
    assert LocalPlacement(server_cpus=[3, 1]).server_cpus == [1, 3]
    for bad in ([], [-1], [1, 1]):
        with pytest.raises(ValidationError, match="server_cpus"):
            LocalPlacement(server_cpus=bad)


def test_keep_off_moves_every_thread_and_release_restores(monkeypatch):
    calls: list[set[int]] = []
    monkeypatch.setattr(cpus, "set_process_affinity", lambda c: calls.append(set(c)))
    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    log = logging.getLogger("test")
    cpus.keep_off("a", {3}, log)
    cpus.keep_off("b", {2}, log)  # two sessions: off the union of their CPUs
    assert cpus.available_cpus() == {0, 1, 2, 3}  # a third session may still ask for any
    cpus.release("a", log)
    cpus.release("a", log)  # a second teardown changes nothing
    cpus.release("b", log)
    assert calls == [{0, 1, 2}, {0, 1}, {0, 1, 3}, {0, 1, 2, 3}]
    cpus.keep_off("c", {0, 1, 2, 3}, log)  # nothing left: stays on all of them
    cpus.release("c", log)
    assert calls[-2:] == [{0, 1, 2, 3}, {0, 1, 2, 3}] and cpus._original is None
