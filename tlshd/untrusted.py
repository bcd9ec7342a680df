"""Untrusted bytes in log lines and error messages: escaped, bounded, the cut counted.

A peer chooses its PSK identities, its certificate's names and whatever garbage it sends; the
kernel side passes a peer name. None of it may go into a log unchanged: a 60,000-byte identity
made a 60,000-byte log line, and control characters could forge lines. ``show`` quotes and
escapes like ``repr`` (so a newline is ``\\n``), keeps at most ``limit`` bytes and says how
many it dropped; ``show_all`` does that for a list and keeps at most ``items`` of them.
"""

from __future__ import annotations

from collections.abc import Sequence

LIMIT = 96
ITEMS = 4


def show(data: bytes | str, limit: int = LIMIT) -> str:
    raw = data.encode("utf-8", "backslashreplace") if isinstance(data, str) else data
    text = repr(raw[:limit].decode("utf-8", "backslashreplace"))
    return text if len(raw) <= limit else f"{text}...(+{len(raw) - limit} bytes)"


def show_all(items: Sequence[bytes | str], limit: int = LIMIT, most: int = ITEMS) -> str:
    shown = ", ".join(show(item, limit) for item in items[:most])
    return shown if len(items) <= most else f"{shown} (+{len(items) - most} more)"
