"""The chart's cleanup-wait hook: it ends only once every node's cleanup pod is ready."""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
from collections.abc import Iterator
from types import ModuleType

import pytest

from deploy.render import CHART

SCRIPT = CHART / "files" / "cleanup_wait.py"


@pytest.fixture(scope="module")
def cleanup_wait() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cleanup_wait", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Polls:
    """DNS answers for the all-pods and ready-pods names, one pair per poll."""

    def __init__(self, answers: list[tuple[set[str], set[str]]]) -> None:
        self._answers: Iterator[tuple[set[str], set[str]]] = iter(answers)
        self._current: tuple[set[str], set[str]] = (set(), set())
        self.sleeps = 0

    def resolve(self, name: str) -> frozenset[str]:
        if name == "all":
            self._current = next(self._answers)
            return frozenset(self._current[0])
        return frozenset(self._current[1])

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1


def test_waits_for_every_pod_on_three_polls_in_a_row(cleanup_wait, capsys):
    a, b = "10.0.1.5", "10.0.2.9"
    done = ({a, b}, {a, b})
    polls = Polls(
        [(set(), set()), ({a}, {a}), ({a, b}, {a}), done, ({a, b}, {b}), done, done, done]
    )
    cleanup_wait.wait("all", "ready", polls.resolve, polls.sleep)
    assert polls.sleeps == 7, "a poll with nothing listed, or a pod not ready, starts over"
    assert capsys.readouterr().out.splitlines()[-1] == "cleanup done on 2 of 2 nodes"


def test_a_name_that_does_not_resolve_lists_no_pod(cleanup_wait, monkeypatch):
    assert "127.0.0.1" in cleanup_wait.addresses("localhost")

    def no_such_name(*args: object, **kwargs: object) -> None:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    # A headless Service with no endpoints yet: the cluster DNS answers NXDOMAIN.
    monkeypatch.setattr(socket, "getaddrinfo", no_such_name)
    assert cleanup_wait.addresses("spegel-tx-cleanup.spegel-tx.svc.cluster.local.") == frozenset()


def test_the_script_runs_as_the_hook_pod_runs_it():
    """``python3 -c <script> NAME NAME`` with the image's Python and nothing else."""
    script = SCRIPT.read_text()
    usage = subprocess.run(
        [sys.executable, "-I", "-c", script], capture_output=True, text=True, timeout=30
    )
    assert usage.returncode == 2 and "ALL_PODS_NAME READY_PODS_NAME" in usage.stderr
