"""Two sans-I/O engines talking to each other in memory, until both have a result."""

from __future__ import annotations

from collections.abc import Callable

from tlshd.handshake.engine import HandshakeEngine
from tlshd.handshake.events import Event, NeedData, NeedServerCredentials

Answer = Callable[[HandshakeEngine, NeedServerCredentials], None]


def drive(client: HandshakeEngine, server: HandshakeEngine, rounds: int = 50,
          answer: Answer | None = None) -> tuple[Event, Event]:
    """Shuttle bytes both ways; returns (client event, server event). ``answer`` plays the
    worker for a server that asks for its credentials."""
    for _ in range(rounds):
        for src, dst in ((client, server), (server, client)):
            asked = src.next_event()
            if isinstance(asked, NeedServerCredentials):
                assert answer is not None, "the server asked for credentials"
                answer(src, asked)
            data = src.data_to_send()
            if data and isinstance(dst.next_event(), NeedData | NeedServerCredentials):
                dst.receive_data(data)
        events = (client.next_event(), server.next_event())
        if not any(isinstance(e, NeedData | NeedServerCredentials) for e in events):
            return events
    raise AssertionError("the handshake did not finish")
