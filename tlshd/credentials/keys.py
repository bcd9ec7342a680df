"""The keys one request may use, from the kernel's keyrings.

The worker asks for a request's keys through ``RequestKeys``: ``LocalKeys`` reads the keyrings
itself; a handshake process without privileges (``tlshd.agent.privsep``) asks its monitor, which
answers only for the request that names the key. The policy is the same either way:

* a client PSK is one of the ACCEPT's peer identities, tried in order;
* a server PSK is searched for by the offered identity in the request's keyring, then in the
  session keyring (where the configured keyrings and ``.nvme`` are linked); never in the whole
  process keyring, which also holds the keyrings the kernel linked for other requests;
* keyring-provisioned x509 credentials are the ACCEPT's certificate and private key serials;
* a verified peer certificate becomes a ``user`` key whose serial goes in DONE;
* at start (``link_keyrings``) the kernel's keyrings that exist and the configured ones are
  linked into the session keyring, which the server search then covers.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Sequence
from typing import Protocol

from tlshd import keyring
from tlshd.credentials.psk import PSK, find_server_psk, next_client_psk
from tlshd.errors import CredentialError, KeyNotFoundError, TlshdError
from tlshd.netlink.messages import AcceptReply

log = logging.getLogger("tlshd")
PEER_KEY_TIMEOUT_S = 600
MAX_PEER_KEY = 65536


class RequestKeys(Protocol):
    def client_psk(self, reply: AcceptReply, serials: Sequence[int]
                   ) -> tuple[PSK, tuple[int, ...]]: ...

    def server_psk(self, reply: AcceptReply, identities: Sequence[bytes]) -> PSK | None: ...

    def x509(self, reply: AcceptReply) -> tuple[bytes, bytes]: ...

    def peer_key(self, der: bytes) -> int: ...

    def release(self, reply: AcceptReply) -> None: ...


def server_keyrings(reply: AcceptReply) -> list[int]:
    return [k for k in (reply.keyring, keyring.KEY_SPEC_SESSION_KEYRING) if k]


class LocalKeys:
    """This process reads the keyrings itself."""

    def client_psk(self, reply: AcceptReply, serials: Sequence[int]
                   ) -> tuple[PSK, tuple[int, ...]]:
        return next_client_psk(serials)

    def server_psk(self, reply: AcceptReply, identities: Sequence[bytes]) -> PSK | None:
        return find_server_psk(identities, server_keyrings(reply))

    def x509(self, reply: AcceptReply) -> tuple[bytes, bytes]:
        if reply.certificate is None:
            raise CredentialError("the request names no certificate serials")
        return (keyring.read_key(reply.certificate.cert),
                keyring.read_key(reply.certificate.privkey))

    def peer_key(self, der: bytes) -> int:
        """A key holding the verified peer certificate (DER); its serial goes in REMOTE_AUTH.

        The NFS server needs a non-zero peer id to mark the peer authenticated
        (XPT_PEER_AUTH); a real key lets a consumer inspect the certificate. The key lives
        in this process's keyring and expires after ten minutes."""
        if len(der) > MAX_PEER_KEY:
            raise CredentialError(f"peer certificate of {len(der)} bytes")
        description = "tlshd:peer:" + hashlib.sha256(der).hexdigest()[:32]
        serial = keyring.add_key("user", description, der, keyring.KEY_SPEC_PROCESS_KEYRING)
        keyring.set_key_timeout(serial, PEER_KEY_TIMEOUT_S)
        return serial

    def release(self, reply: AcceptReply) -> None:
        """The kernel linked the request's keyring into our process keyring at ACCEPT; the
        process lives on, so drop the link: one request's keys are not the next one's."""
        if reply.keyring:
            with contextlib.suppress(TlshdError):
                keyring.unlink_key(reply.keyring, keyring.KEY_SPEC_PROCESS_KEYRING)


LOCAL_KEYS = LocalKeys()


def link_keyrings(names: tuple[str, ...], where: str = "") -> list[tuple[str, int]]:
    """Link the kernel's keyrings that exist and the configured ones into our session keyring,
    so PSK searches find their keys (under systemd the service has a session keyring of its
    own). One that does not exist is skipped with a warning for a configured one, as
    ktls-utils does (src/tlshd/keyring.c, tlshd_keyring_link_session): ``.nvme`` appears
    only when the nvme module loads, perhaps after the agent; ``tlshd doctor`` reports it."""
    linked = []
    for name in dict.fromkeys((*keyring.KERNEL_KEYRINGS, *names)):
        try:
            serial = keyring.find_keyring(name)
        except KeyNotFoundError:
            if name in names:
                log.warning("%s: keyring %r not found, not linked",
                            f"{where} [authenticate] keyrings".strip(), name)
            continue
        keyring.link_key(serial, keyring.KEY_SPEC_SESSION_KEYRING)
        linked.append((name, serial))
    return linked
