"""Failure log lines per source address: a few one by one, the rest as one summary line.

A peer that fails handshake after handshake (a scanner, a misconfigured client in a loop, an
attacker) must not fill the log, or hide the other failures in it. ``FailureLimiter`` lets
``burst`` lines per source through in each ``window_s``; later failures from that source in
the same window are only counted, and ``due`` hands back, once the window is over, how many
were held back, for one summary line. At most ``max_sources`` sources are tracked at once; the
failures of further ones in that time share one entry, ``OTHERS``. ``burst`` 0 lets every line
through. Pure: the clock is the caller's.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class _Window:
    opened: float
    logged: int = 0
    held: int = 0


OTHERS = "(other sources)"


@dataclass
class FailureLimiter:
    burst: int = 5
    window_s: float = 10.0
    max_sources: int = 4096
    _windows: dict[str, _Window] = field(default_factory=dict)
    _ended: list[tuple[str, int]] = field(default_factory=list)

    def allow(self, source: str, now: float) -> bool:
        """True: log this failure; False: it is counted for the summary."""
        if self.burst <= 0:
            return True
        if source not in self._windows and len(self._windows) >= self.max_sources:
            source = OTHERS
        window = self._windows.get(source)
        if window is None or now - window.opened >= self.window_s:
            if window is not None and window.held:
                self._ended.append((source, window.held))
            window = self._windows[source] = _Window(now)
        if window.logged < self.burst:
            window.logged += 1
            return True
        window.held += 1
        return False

    def due(self, now: float) -> list[tuple[str, int]]:
        """(source, failures held back) of the windows that ended; they are forgotten."""
        ended = [(s, w) for s, w in self._windows.items() if now - w.opened >= self.window_s]
        for source, _ in ended:
            del self._windows[source]
        out, self._ended = self._ended + [(s, w.held) for s, w in ended if w.held], []
        return out


def source_of(addr: str) -> str:
    """The address of ``host:port`` or ``[v6]:port`` without the port."""
    host, sep, _port = addr.rpartition(":")
    return host if sep else addr
