"""The unit tier does no I/O: a test here that opens a socket or starts a process fails, so the
tier stays fast and means what its name says (tests that need either belong in integration)."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from typing import Any, NoReturn

import pytest


def _refuse(what: str) -> Any:
    def refused(*args: Any, **kwargs: Any) -> NoReturn:
        raise AssertionError(f"unit tests do no I/O: {what} called; move this test to "
                             "tests/integration")
    return refused


@pytest.fixture(autouse=True)
def no_io(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # asyncio's own self-pipe is a socketpair(): neither connects nor binds, so loops still run
    monkeypatch.setattr(socket.socket, "connect", _refuse("socket.connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", _refuse("socket.connect_ex"))
    monkeypatch.setattr(socket.socket, "bind", _refuse("socket.bind"))
    monkeypatch.setattr(subprocess.Popen, "__init__", _refuse("subprocess.Popen"))
    yield
