"""The TLS handshake protocol of the upcall, after ``net/handshake/tlshd.c``.

``TLSHandshakeArgs`` is ``struct tls_handshake_args``; ``TLSProto`` is
``tls_handshake_proto`` (handler class TLSHD): it builds the ACCEPT reply in
the kernel's attribute order and turns DONE into the consumer's callback
``done(data, status, peerid)`` with status negated (the wire carries a
positive errno) and only the first REMOTE_AUTH id (TLS_NO_PEERID = 0 when
none). The request functions (``tls_client_hello_*``, ``tls_server_hello_*``)
live on the Kernel object, which resolves the socket's namespace.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kernel_sim import genl
from kernel_sim.handshake.request import HANDLER_CLASS_TLSHD, HandshakeReq
from kernel_sim.profile import KernelProfile

# include/uapi/linux/handshake.h
MSG_TYPE_UNSPEC, MSG_TYPE_CLIENTHELLO, MSG_TYPE_SERVERHELLO = 0, 1, 2
AUTH_UNSPEC, AUTH_UNAUTH, AUTH_PSK, AUTH_X509 = 0, 1, 2, 3
A_ACCEPT_SOCKFD = 1
A_ACCEPT_HANDLER_CLASS = 2
A_ACCEPT_MESSAGE_TYPE = 3
A_ACCEPT_TIMEOUT = 4
A_ACCEPT_AUTH_MODE = 5
A_ACCEPT_PEER_IDENTITY = 6
A_ACCEPT_CERTIFICATE = 7
A_ACCEPT_PEERNAME = 8
A_ACCEPT_KEYRING = 9
A_X509_CERT = 1
A_X509_PRIVKEY = 2
A_DONE_STATUS = 1
A_DONE_SOCKFD = 2
A_DONE_REMOTE_AUTH = 3
TLS_NO_PEERID = 0
TLS_NO_CERT = 0
TLS_NO_PRIVKEY = 0
TLS_MAX_PEERIDS = 5

DoneCallback = Callable[[Any, int, int], None]


@dataclass
class TLSHandshakeArgs:
    """``struct tls_handshake_args``."""

    sock: socket.socket
    done: DoneCallback
    data: Any = None
    peername: str | None = None
    timeout_ms: int = 0
    keyring: int = 0
    my_cert: int = TLS_NO_CERT
    my_privkey: int = TLS_NO_PRIVKEY
    my_peerids: tuple[int, ...] = ()
    # filled before ``done`` runs with the session tags of a successful DONE (the posted
    # session-tags series; how that series hands them to a consumer is modelled, not copied)
    session_tags: list[str] = field(default_factory=list)


@dataclass
class TLSHandshakeReq:
    """``struct tls_handshake_req``: the private part of a handshake_req."""

    msg_type: int
    auth_mode: int
    consumer_done: DoneCallback
    consumer_data: Any
    timeout_ms: int = 0
    keyring: int = 0
    certificate: int = TLS_NO_CERT
    privkey: int = TLS_NO_PRIVKEY
    peerids: tuple[int, ...] = field(default_factory=tuple)
    peername: str | None = None
    session_tags: list[str] = field(default_factory=list)

    @classmethod
    def from_args(cls, args: TLSHandshakeArgs, msg_type: int, auth_mode: int) -> TLSHandshakeReq:
        return cls(
            msg_type=msg_type,
            auth_mode=auth_mode,
            consumer_done=args.done,
            consumer_data=args.data,
            timeout_ms=args.timeout_ms,
            keyring=args.keyring,
            peername=args.peername,
            session_tags=args.session_tags,
        )


class TLSProto:
    """``tls_handshake_proto``."""

    handler_class = HANDLER_CLASS_TLSHD

    def __init__(self, profile: KernelProfile) -> None:
        self.profile = profile

    def accept_attrs(self, req: HandshakeReq, fd: int) -> bytes:
        """``tls_handshake_accept``: the reply's attributes, in the kernel's order."""
        treq: TLSHandshakeReq = req.priv
        parts = [
            genl.nla_u32(A_ACCEPT_SOCKFD, fd),
            genl.nla_u32(A_ACCEPT_MESSAGE_TYPE, treq.msg_type),
        ]
        if treq.peername and self.profile.accept_peername:
            parts.append(genl.nla_string(A_ACCEPT_PEERNAME, treq.peername))
        if treq.timeout_ms:
            parts.append(genl.nla_u32(A_ACCEPT_TIMEOUT, treq.timeout_ms))
        if treq.keyring and self.profile.accept_keyring:
            parts.append(genl.nla_s32(A_ACCEPT_KEYRING, treq.keyring))
        parts.append(genl.nla_u32(A_ACCEPT_AUTH_MODE, treq.auth_mode))
        if treq.auth_mode == AUTH_PSK:
            parts += [genl.nla_u32(A_ACCEPT_PEER_IDENTITY, p) for p in treq.peerids]
        elif treq.auth_mode == AUTH_X509 and (treq.certificate or treq.privkey):
            parts.append(genl.nla_nest(A_ACCEPT_CERTIFICATE, [
                genl.nla_u32(A_X509_CERT, treq.certificate),
                genl.nla_u32(A_X509_PRIVKEY, treq.privkey),
            ]))
        return b"".join(parts)

    def done(self, req: HandshakeReq, status: int, remote_auth: tuple[int, ...] | None) -> None:
        """``tls_handshake_done``: only the first of at most 5 remote ids reaches the consumer."""
        treq: TLSHandshakeReq = req.priv
        peerid = remote_auth[0] if remote_auth else TLS_NO_PEERID
        if status == 0:
            treq.session_tags[:] = req.session_tags
        treq.consumer_done(treq.consumer_data, status, peerid)
