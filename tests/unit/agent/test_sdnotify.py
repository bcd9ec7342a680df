"""tlshd.agent.sdnotify against real AF_UNIX datagram sockets, as systemd's notify socket is."""

from __future__ import annotations

import logging
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tlshd.agent import sdnotify


@pytest.fixture
def path_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    yield sock
    sock.close()


@pytest.fixture
def abstract_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    name = f"tlshd-test-notify-{uuid.uuid4().hex[:10]}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    yield sock
    sock.close()


def test_ready_reaches_a_path_socket(path_socket: socket.socket) -> None:
    assert sdnotify.notify(sdnotify.READY, sdnotify.status("serving with 2 workers"))
    assert path_socket.recv(4096) == b"READY=1\nSTATUS=serving with 2 workers"


def test_ready_reaches_an_abstract_socket(abstract_socket: socket.socket) -> None:
    assert sdnotify.notify(sdnotify.READY)
    assert abstract_socket.recv(4096) == b"READY=1"


def test_each_call_is_one_datagram(path_socket: socket.socket) -> None:
    sdnotify.notify(sdnotify.RELOADING, sdnotify.monotonic_usec())
    sdnotify.notify(sdnotify.READY)
    sdnotify.notify(sdnotify.STOPPING)
    first = path_socket.recv(4096).split(b"\n")
    assert first[0] == b"RELOADING=1" and first[1].startswith(b"MONOTONIC_USEC=")
    assert path_socket.recv(4096) == b"READY=1"
    assert path_socket.recv(4096) == b"STOPPING=1"


def test_monotonic_usec_is_clock_monotonic() -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    value = int(sdnotify.monotonic_usec().removeprefix("MONOTONIC_USEC="))
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert before <= value <= after


def test_status_is_one_line() -> None:
    assert sdnotify.status("a\nb\t c") == "STATUS=a b c"


def test_without_notify_socket_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify(sdnotify.READY) is False


@pytest.mark.parametrize("value", ["", "@", "relative/path", "vsock:2:1234"])
def test_unusable_addresses_are_ignored(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert sdnotify.notify(sdnotify.READY) is False


def test_no_fields_sends_nothing(path_socket: socket.socket) -> None:
    assert sdnotify.notify() is False
    path_socket.settimeout(0.1)
    with pytest.raises(TimeoutError):
        path_socket.recv(4096)


def test_send_errors_never_raise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    with caplog.at_level(logging.DEBUG, logger="tlshd"):
        assert sdnotify.notify(sdnotify.STOPPING) is False
    assert "sd_notify" in caplog.text


def test_a_stream_socket_is_a_send_error(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(tmp_path / "stream"))
        listener.listen()
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "stream"))
        assert sdnotify.notify(sdnotify.READY) is False
