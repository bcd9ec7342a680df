"""Errors that carry the status the kernel sees in DONE.

Every failure of a handshake request ends in exactly one DONE whose STATUS is
a positive errno (0 on success). The exception raised where the failure is
detected decides that errno: the edge that knows what went wrong picks the
class, and the worker only copies ``err.status`` into DONE.

Local errors (our configuration, our keys, our kernel) and remote errors (the
peer's behaviour) are split so logs can say whose fault a failure was.
Messages never contain key material: callers pass descriptions, not secrets.
"""

from __future__ import annotations

import errno

MAX_ERRNO = 4095


class TlshdError(Exception):
    """Base class; ``status`` is the positive errno reported in DONE."""

    status: int = errno.EACCES

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status
        if not 0 < self.status <= MAX_ERRNO:
            raise ValueError(f"DONE status must be an errno in 1..{MAX_ERRNO}, not {self.status}")


# --- malformed input -------------------------------------------------------


class DecodeError(TlshdError):
    """Malformed bytes: a netlink message, a key payload, a TLS record."""

    status = errno.EINVAL


# --- the peer ---------------------------------------------------------------


class RemoteError(TlshdError):
    """The TLS peer misbehaved or could not be authenticated."""


class PeerAuthenticationError(RemoteError):
    """Certificate chain, name or key check failed; a fatal alert came in."""

    status = errno.EACCES


class PeerProtocolError(RemoteError):
    """The peer spoke something that is not TLS 1.3 (garbage, TLS 1.2 only, ...)."""

    status = errno.EACCES


class PeerClosedError(RemoteError):
    """The peer closed the connection before the handshake finished.

    ETIMEDOUT, as ktls-utils since b010190 ("Pass ETIMEDOUT from gnutls to kernel",
    GNUTLS_E_PREMATURE_TERMINATION in src/tlshd/handshake.c): the consumer retries a
    dropped connection (NFS hard mounts, writeback) instead of failing it."""

    status = errno.ETIMEDOUT


class UnknownPSKIdentityError(RemoteError):
    """The peer's PSK identity matched no key we hold (or it rejected ours)."""

    status = errno.EKEYREJECTED


class HandshakeTimeoutError(TlshdError):
    """The request's time budget ran out."""

    status = errno.ETIMEDOUT


# --- our side ----------------------------------------------------------------


class LocalError(TlshdError):
    """Something on this host is wrong: configuration, keys, kernel."""


class PeerLimitError(LocalError):
    """A source address already holds as many server handshakes as it may
    (``[agent] max_inflight_per_peer``): the new one is refused before any TLS."""

    status = errno.EBUSY


class UnsupportedRequestError(LocalError):
    """The kernel asked for something this agent cannot honour."""

    status = errno.EINVAL


class UnsupportedProtocolError(LocalError):
    """The request's socket is not TCP (QUIC, ...): EOPNOTSUPP, as ktls-utils answers."""

    status = errno.EOPNOTSUPP


class ConfigError(LocalError):
    """A configuration file or value is unusable. ``where`` names file:line [key]."""

    status = errno.EINVAL

    def __init__(self, message: str, *, where: str = "") -> None:
        super().__init__(f"{where}: {message}" if where else message)
        self.where = where


class CredentialError(LocalError):
    """A certificate, private key or trust store cannot be used."""

    status = errno.ENOKEY


class KeyNotFoundError(CredentialError):
    status = errno.ENOKEY


class KeyRevokedError(CredentialError):
    status = errno.EKEYREVOKED


class KeyAccessError(CredentialError):
    status = errno.EACCES


class KTLSInstallError(LocalError):
    """setsockopt(TCP_ULP / SOL_TLS) failed; status is the errno the kernel gave."""

    status = errno.EIO


class TransportError(LocalError):
    """The upcall channel to the kernel failed (netlink socket, kernel-sim endpoint)."""

    status = errno.EIO


class TransportTimeoutError(TransportError):
    """The kernel side did not answer in time; the channel itself may be fine."""

    status = errno.ETIMEDOUT


class NetlinkError(TransportError):
    """The kernel answered a request with NLMSG_ERROR; ``errno`` is positive."""

    def __init__(self, err: int, context: str) -> None:
        self.errno = err
        super().__init__(f"{context}: {errno.errorcode.get(err, str(err))} ({err})")
