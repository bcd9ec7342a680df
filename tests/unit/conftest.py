"""Fixtures the unit tests share."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

WAIT_S = 5.0


@pytest.fixture
def tcp() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected loopback pair: (consumer's socket, its peer)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        consumer = socket.create_connection(listener.getsockname(), timeout=WAIT_S)
        peer, _ = listener.accept()
    yield consumer, peer
    consumer.close()
    peer.close()
