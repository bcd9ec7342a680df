"""Which credentials a request uses, decided in one place.

``Chooser.start(reply)`` gives the engine for an accepted request and the PSK state it
carries:

* x509 and anonymous requests: the context ``Contexts`` picks (the configured server or
  client credentials, or the certificate and key serials the ACCEPT names);
* a PSK client: the first readable key among the ACCEPT's peer identities (the rest stay for
  a retry, ``retry``);
* a PSK server: an engine that asks (``NeedServerCredentials``) once the ClientHello is
  whole; ``answer`` looks the offered identities up and gives the engine the context and the
  key, or refuses (``unknown_psk_identity`` when no key has the identity).

Keys come through ``RequestKeys`` (tlshd.credentials.keys): the keyrings here, or the monitor
in a confined handshake process. The chooser holds no socket and reads no clock.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from OpenSSL import SSL

from tlshd.credentials.keys import RequestKeys
from tlshd.credentials.psk import PSK
from tlshd.errors import TlshdError, UnknownPSKIdentityError, UnsupportedRequestError
from tlshd.handshake import _psk
from tlshd.handshake.engine import HandshakeEngine, Role
from tlshd.handshake.events import NeedServerCredentials
from tlshd.handshake.secrets import HashAlg
from tlshd.netlink.messages import AcceptReply
from tlshd.netlink.spec import AuthMode, MsgType
from tlshd.untrusted import show, show_all


class ContextProvider(Protocol):
    """``tlshd.credentials.contexts.Contexts``: a context per x509 or anonymous request,
    PSK ones by hash."""

    @property
    def psk_client(self) -> Mapping[HashAlg, SSL.Context]: ...

    @property
    def psk_server(self) -> Mapping[HashAlg, SSL.Context]: ...

    def __call__(self, reply: AcceptReply) -> SSL.Context: ...


@dataclass(eq=False)
class PSKChoice:
    """The PSK a handshake uses: known at the start (client) or after the ClientHello.

    A client also keeps the ACCEPT's keys after this one (``untried``) and the first
    failure (``first_error``): a server that refuses one key may accept the next."""

    psk: PSK | None = None
    untried: tuple[int, ...] = ()
    first_error: TlshdError | None = None

    def describe(self) -> str:
        if self.psk is None:
            return ""
        return f" psk={self.psk.serial}:{show(self.psk.identity)}"


def _attach(psk: PSK) -> Callable[[SSL.Connection], None]:
    return lambda conn: _psk.attach(conn, psk.identity, psk.key, psk.suite)


class Chooser:
    """``engine_io``: what the engines may not do themselves (``timer``, ``keylog``)."""

    def __init__(self, contexts: ContextProvider, keys: RequestKeys, *,
                 cn_fallback: bool = False, engine_io: dict[str, Any] | None = None) -> None:
        self._contexts, self._keys = contexts, keys
        self._cn_fallback = cn_fallback
        self._io = engine_io or {}

    def start(self, reply: AcceptReply) -> tuple[HandshakeEngine, PSKChoice]:
        if reply.message_type not in (MsgType.CLIENTHELLO, MsgType.SERVERHELLO):
            raise UnsupportedRequestError(f"message type {reply.message_type!r}")
        if reply.auth_mode not in (AuthMode.UNAUTH, AuthMode.X509, AuthMode.PSK):
            raise UnsupportedRequestError(f"auth mode {reply.auth_mode!r}")
        client = reply.message_type == MsgType.CLIENTHELLO
        choice = PSKChoice()
        if reply.auth_mode == AuthMode.PSK and client:
            choice.psk, choice.untried = self._keys.client_psk(reply, reply.peer_identities)
            return self._psk_client(choice.psk), choice
        if reply.auth_mode == AuthMode.PSK:
            return HandshakeEngine(self._contexts.psk_server[HashAlg.SHA256], Role.SERVER,
                                   await_credentials=True, **self._io), choice
        role = Role.CLIENT if client else Role.SERVER
        return HandshakeEngine(self._contexts(reply), role,
                               peername=reply.peername if client else None,
                               cn_fallback=self._cn_fallback, **self._io), choice

    def answer(self, engine: HandshakeEngine, reply: AcceptReply,
               asked: NeedServerCredentials, choice: PSKChoice) -> None:
        """A PSK server's question: the key of the first offered identity found, or a
        refusal (the key is there but unusable: that error; none: unknown_psk_identity)."""
        try:
            psk = self._keys.server_psk(reply, asked.identities)
        except TlshdError as exc:
            engine.refuse(exc)
            return
        if psk is None:
            offered = show_all(asked.identities)
            engine.refuse(UnknownPSKIdentityError(
                f"no PSK key for identity {offered or '(none)'}"))
            return
        choice.psk = psk
        engine.use_credentials(self._contexts.psk_server[psk.hash_alg], _attach(psk))

    def retry(self, reply: AcceptReply, choice: PSKChoice,
              error: TlshdError | None) -> HandshakeEngine | None:
        """A PSK client's next key after the server refused ``choice.psk``, or None (no key
        left that can be read: the first failure stands)."""
        try:
            psk, untried = self._keys.client_psk(reply, choice.untried)
        except TlshdError:
            return None
        choice.first_error = choice.first_error or error
        choice.psk, choice.untried = psk, untried
        return self._psk_client(psk)

    def _psk_client(self, psk: PSK) -> HandshakeEngine:
        return HandshakeEngine(self._contexts.psk_client[psk.hash_alg], Role.CLIENT,
                               on_connection=_attach(psk), **self._io)
