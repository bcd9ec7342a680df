"""The supervisor's local endpoints: ``tlshd status`` and the Prometheus metrics.

Control socket: an *abstract* Unix stream socket, ``\\0tlshd/control``. Abstract
names are scoped by network namespace, so each per-namespace instance
(``tlshd@NS.service``) has its own, and ``ip netns exec NS tlshd status``
reaches the right one. Only root or the agent's own uid may ask (SO_PEERCRED):
the status names peers. One request per connection: ``status\\n`` -> a JSON
document.

Metrics: when ``[agent] metrics = HOST:PORT`` is set, a plain HTTP endpoint
serves ``GET /metrics`` in the Prometheus text format, rendered by
prometheus-client from a registry the supervisor updates with every event.
Both are served from the supervisor's selector loop: no threads, so forking
workers stays safe.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
from typing import Any

from tlshd.agent.events import App, Done, Limit, WorkerEvent
from tlshd.agent.stats import DURATION_BUCKETS_S, status_name
from tlshd.config import parse_listen
from tlshd.errors import ConfigError, TransportError

CONTROL_ADDRESS = b"\0tlshd/control"
MAX_REQUEST = 4096


def control_listener(address: bytes = CONTROL_ADDRESS) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise TransportError(f"control socket {address[1:].decode()!r}: {exc.strerror} "
                             "(another tlshd in this network namespace?)") from None
    sock.listen(16)
    sock.setblocking(False)
    return sock


def peer_allowed(conn: socket.socket) -> bool:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid in (0, os.geteuid())


def answer_control(conn: socket.socket, document: dict[str, Any]) -> None:
    """Read one request and answer it; the connection is closed by the caller."""
    conn.settimeout(1.0)
    try:
        request = conn.recv(MAX_REQUEST).strip()
        if not peer_allowed(conn):
            reply: dict[str, Any] = {"error": "permission denied"}
        elif request == b"status":
            reply = document
        else:
            reply = {"error": f"unknown request {request[:40]!r}"}
        conn.sendall(json.dumps(reply).encode() + b"\n")
    except OSError:
        return


def query_status(address: bytes = CONTROL_ADDRESS, timeout: float = 5.0) -> dict[str, Any]:
    """The running agent's status document (``tlshd status``)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(address)
            sock.sendall(b"status\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        except OSError as exc:
            raise TransportError(f"no tlshd answers in this network namespace "
                                 f"({exc.strerror})") from None
    reply: dict[str, Any] = json.loads(data)
    if "error" in reply:
        raise TransportError(f"tlshd refused: {reply['error']}")
    return reply


# --- Prometheus ----------------------------------------------------------------------------


class Metrics:
    """The Prometheus registry; updated from worker events, rendered on request.

    Beside tlshd's own series it carries prometheus-client's standard collectors, as any
    Python exporter does: ``process_*`` (the supervisor's CPU, memory, fds, start time),
    ``python_info`` and ``python_gc_*``, and ``tlshd_build_info`` naming this release, the
    Python and the OpenSSL the agent runs with."""

    def __init__(self) -> None:
        from prometheus_client import (
            GC_COLLECTOR,
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
            Info,
            PlatformCollector,
            ProcessCollector,
        )

        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.registry.register(GC_COLLECTOR)
        Info("tlshd_build", "This tlshd release and the libraries it runs with",
             registry=self.registry).info(build_info())
        self.handshakes = Counter("tlshd_handshakes", "Handshake requests finished",
                                  ["role", "auth", "result"], registry=self.registry)
        self.statuses = Counter("tlshd_done_status", "DONE statuses sent to the kernel",
                                ["status"], registry=self.registry)
        self.duration = Histogram("tlshd_handshake_duration_seconds",
                                  "ACCEPT to DONE, per request", ["role", "auth"],
                                  buckets=DURATION_BUCKETS_S, registry=self.registry)
        self.inflight = Gauge("tlshd_in_flight", "Handshakes in progress",
                              registry=self.registry)
        self.reloads = Counter("tlshd_reloads", "Configuration reloads", ["result"],
                               registry=self.registry)
        self.apps = Counter("tlshd_app_connections", "Applications' requests finished "
                            "(tlshd.app, tlshd wrap), by the policy rule that allowed them",
                            ["rule", "role", "result"], registry=self.registry)
        self.limits = Counter("tlshd_limit_hits", "Handshakes ended by a per-peer limit "
                              "(first_flight: no first message in time; per_peer: too many "
                              "from one address)", ["limit"], registry=self.registry)

    def observe(self, event: WorkerEvent, inflight: int) -> None:
        self.inflight.set(inflight)
        if isinstance(event, Limit):
            self.limits.labels(event.limit).inc()
            return
        if isinstance(event, App):
            self.apps.labels(event.rule or "-", event.role,
                             "ok" if event.status == 0 else "failed").inc()
            return
        if not isinstance(event, Done):
            return
        result = "ok" if event.status == 0 else "failed"
        self.handshakes.labels(event.role, event.auth, result).inc()
        self.statuses.labels(status_name(event.status)).inc()
        self.duration.labels(event.role, event.auth).observe(event.ms / 1000)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return bytes(generate_latest(self.registry))


def build_info() -> dict[str, str]:
    """The labels of ``tlshd_build_info``: versions only, nothing about the host's keys."""
    import platform

    import cryptography
    import OpenSSL
    from OpenSSL import SSL

    from tlshd import __version__

    return {
        "version": __version__,
        "python": platform.python_version(),
        "pyopenssl": OpenSSL.__version__,
        "cryptography": cryptography.__version__,
        "openssl": SSL.SSLeay_version(SSL.SSLEAY_VERSION).decode(errors="replace"),
    }


def metrics_listener(value: str) -> socket.socket:
    host, port = parse_listen(value)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    except OSError as exc:  # RestrictAddressFamilies= of the unit, for one
        raise ConfigError(f"cannot open a socket for {value}: {exc.strerror}",
                          where="[agent] metrics") from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {value}: {exc.strerror}",
                          where="[agent] metrics") from None
    sock.listen(16)
    sock.setblocking(False)
    return sock


def answer_http(conn: socket.socket, metrics: Metrics) -> None:
    conn.settimeout(1.0)
    with contextlib.suppress(OSError):
        request = conn.recv(MAX_REQUEST)
        path = request.split(b" ", 2)[1] if request.count(b" ") >= 2 else b""
        if request.startswith(b"GET ") and path in (b"/metrics", b"/"):
            body, status, ctype = metrics.render(), b"200 OK", b"text/plain; version=0.0.4"
        else:
            body, status, ctype = b"not found\n", b"404 Not Found", b"text/plain"
        conn.sendall(b"HTTP/1.0 " + status + b"\r\nContent-Type: " + ctype
                     + b"\r\nContent-Length: " + str(len(body)).encode()
                     + b"\r\nConnection: close\r\n\r\n" + body)
