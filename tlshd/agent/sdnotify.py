"""A minimal sd_notify(3) client: tell the service manager about our state.

Theory of operation: systemd (or any manager speaking the protocol) passes
``$NOTIFY_SOCKET``, the address of an AF_UNIX datagram socket, either a path
(``/run/systemd/notify``) or an abstract name written ``@name``. A notification
is one datagram of newline-separated ``KEY=VALUE`` fields: ``READY=1`` once
the service can serve, ``RELOADING=1`` / ``STOPPING=1`` around a reload or a
stop, ``STATUS=...`` free text for ``systemctl status``.
The manager learns the sender from the kernel's SCM_CREDENTIALS, so with
``NotifyAccess=main`` only the supervisor's messages count.

No dependency (libsystemd's binding is not needed for a datagram), and no
failure can hurt the agent: without ``$NOTIFY_SOCKET`` (not under systemd)
``notify`` does nothing and returns False; a send error is logged at debug
level and also returns False.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("tlshd")

READY = "READY=1"
RELOADING = "RELOADING=1"
STOPPING = "STOPPING=1"


def notify(*fields: str) -> bool:
    """Send ``fields`` (``KEY=VALUE`` strings) as one notification; True if it was sent."""
    address = _address(os.environ.get("NOTIFY_SOCKET", ""))
    if address is None or not fields:
        return False
    message = "\n".join(fields).encode("utf-8", "replace")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, address)
    except OSError as exc:
        log.debug("sd_notify to %r failed: %s", os.environ.get("NOTIFY_SOCKET"), exc)
        return False
    return True


def status(text: str) -> str:
    """A ``STATUS=`` field: one line of text for ``systemctl status``."""
    return "STATUS=" + " ".join(text.split())


def monotonic_usec() -> str:
    """A ``MONOTONIC_USEC=`` field: CLOCK_MONOTONIC now, which systemd wants with
    ``RELOADING=1`` (required by ``Type=notify-reload``, harmless before systemd 253)."""
    return f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"


def _address(value: str) -> str | bytes | None:
    """The socket address of ``$NOTIFY_SOCKET``: a path, or an abstract name
    (leading NUL); None when unset or of a kind we do not speak (e.g. vsock:)."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    if value:
        log.debug("NOTIFY_SOCKET=%r: not a path or an abstract name, ignored", value)
    return None
