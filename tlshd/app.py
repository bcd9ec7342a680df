"""Secure sockets for applications: ask the agent for TLS on a connected TCP socket.

    from tlshd.app import secure_client, secure_server

    sock = socket.create_connection(("nfs.example", 443))
    result = secure_client(sock, server_name="nfs.example")
    sock.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")  # plain calls; the kernel encrypts (kTLS)

The agent (with ``[app] enabled=true``) runs the TLS 1.3 handshake on the socket with the
system's credentials and trust (its configuration), installs the session keys in the kernel
and answers with the status and the verified peer. The application never holds a key, a
certificate or a trust decision: the "controlling application" mode of z/OS AT-TLS, and the
"setsockopt() and let the OS figure out the rest" wish. The agent decides by the caller's
credentials, which the kernel vouches for, whether it may ask at all (``[app] allow_users``).

This module needs no TLS library: one datagram out (the request and the socket, SCM_RIGHTS),
one back. The wire format is in :mod:`tlshd.appserver`.
"""

from __future__ import annotations

import array
import base64
import errno
import json
import os
import socket
from dataclasses import dataclass

DEFAULT_ENDPOINT = "tlshd/app"  # an abstract Unix name, per network namespace
MAX_REPLY = 64 * 1024
_SLACK_S = 5.0  # beyond the handshake's own timeout: the agent's DONE, the reply


class SecureSocketError(OSError):
    """The agent refused the request or the handshake failed: ``errno`` says how
    (EACCES: not allowed, or the peer was not trusted; ETIMEDOUT; ECONNREFUSED: no agent)."""


@dataclass(frozen=True)
class Secured:
    """A socket that now carries TLS in the kernel: whom it talks to and how."""

    peer: str  # the verified peer certificate's subject ("" when the peer sent none)
    cipher: str
    # what the server sent before the hand-over, decrypted: read it before the socket's
    # data (b"" unless a server speaks first within the agent's post-handshake wait)
    data: bytes = b""


def secure_client(sock: socket.socket, server_name: str | None = None, *,
                  timeout_ms: int = 10_000, endpoint: str = DEFAULT_ENDPOINT,
                  for_pid: int | None = None) -> Secured:
    """TLS as the client on ``sock`` (connected). ``server_name``: the name the server's
    certificate must carry (SNI too); without it, the peer's address. ``for_pid``: the
    process of the caller's own uid that the socket is for (``tlshd wrap``): the agent
    judges that process's executable and cgroup."""
    return _ask(sock, {"role": "client", "server_name": server_name}, timeout_ms, endpoint,
                for_pid)


def secure_server(sock: socket.socket, *, timeout_ms: int = 10_000,
                  endpoint: str = DEFAULT_ENDPOINT, for_pid: int | None = None) -> Secured:
    """TLS as the server on ``sock`` (accepted), with the agent's server certificate."""
    return _ask(sock, {"role": "server"}, timeout_ms, endpoint, for_pid)


def _ask(sock: socket.socket, request: dict[str, object], timeout_ms: int,
         endpoint: str, for_pid: int | None) -> Secured:
    if not 1 <= timeout_ms <= 600_000:
        raise ValueError(f"timeout_ms must be 1..600000, not {timeout_ms}")
    request = {"v": 1, **request, "timeout_ms": timeout_ms}
    if for_pid is not None:
        request["for_pid"] = for_pid
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as channel:
        channel.bind(b"\0tlshd-app-" + os.urandom(8).hex().encode())  # the agent answers here
        channel.settimeout(timeout_ms / 1000 + _SLACK_S)
        fds = array.array("i", [sock.fileno()])
        try:
            channel.sendmsg([json.dumps(request).encode()],
                            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)],
                            0, b"\0" + endpoint.encode())
            data = channel.recv(MAX_REPLY)
        except (ConnectionRefusedError, FileNotFoundError):
            raise SecureSocketError(errno.ECONNREFUSED, f"no tlshd answers at @{endpoint} "
                                    "([app] enabled=true in its configuration?)") from None
        except TimeoutError:
            raise SecureSocketError(errno.ETIMEDOUT, "the agent did not answer") from None
    return _result(data)


def _result(data: bytes) -> Secured:
    try:
        reply = json.loads(data)
        status = int(reply["status"])
    except (ValueError, KeyError, TypeError):
        raise SecureSocketError(errno.EPROTO, "a malformed answer from the agent") from None
    if status:
        raise SecureSocketError(status, str(reply.get("error") or os.strerror(status)))
    try:
        data = base64.b64decode(reply.get("data", ""), validate=True)
    except (ValueError, TypeError):
        raise SecureSocketError(errno.EPROTO, "a malformed answer from the agent") from None
    return Secured(peer=str(reply.get("peer", "")), cipher=str(reply.get("cipher", "")),
                   data=data)
