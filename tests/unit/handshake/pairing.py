"""Two sans-I/O engines talking to each other in memory, until both have a result."""

from __future__ import annotations

from tlshd.handshake.engine import HandshakeEngine
from tlshd.handshake.events import Event, NeedData


def drive(client: HandshakeEngine, server: HandshakeEngine,
          rounds: int = 50) -> tuple[Event, Event]:
    """Shuttle bytes both ways; returns (client event, server event)."""
    for _ in range(rounds):
        for src, dst in ((client, server), (server, client)):
            data = src.data_to_send()
            if data and isinstance(dst.next_event(), NeedData):
                dst.receive_data(data)
        events = (client.next_event(), server.next_event())
        if not any(isinstance(e, NeedData) for e in events):
            return events
    raise AssertionError("the handshake did not finish")
