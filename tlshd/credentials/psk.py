"""TLS 1.3 pre-shared keys from kernel keyrings (NVMe/TCP), and the ClientHello's offers.

Identities: a PSK key's *description* is its TLS PSK identity. NVMe/TCP
identities (NVMe TCP transport spec, TP 8018; drivers/nvme/common/keyring.c)
read ``NVMe<v><R|G><hh> <hostnqn> <subnqn>[ <digest>]`` where ``hh`` is the
PSK hash: 01 SHA-256 (32-byte key), 02 SHA-384 (48-byte key). The TLS 1.3
suite must use that hash. For other identities the key length decides.

Keys are of type ``psk`` (nvme-keyring.ko). Where that module is missing,
``user`` keys are searched too (QUIC's PSK fallback uses them; kernel-sim
models ``psk`` keys with them). Key bytes never appear in a repr or message.

The server learns the offered identities from the plaintext ClientHello
(``tlshd.handshake.hello``) and picks the context whose suites match the PSK's
hash before OpenSSL chooses a cipher (OpenSSL drops a PSK whose hash differs
from the cipher it already chose).
"""

from __future__ import annotations

import errno
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from tlshd import keyring
from tlshd.errors import CredentialError, KeyNotFoundError, TlshdError
from tlshd.handshake import _psk
from tlshd.handshake.secrets import HashAlg

KEY_TYPES = ("psk", "user")
_NVME_IDENTITY = re.compile(r"^NVMe([01])([RG])(\d\d) ")
_KEY_LEN = {HashAlg.SHA256: 32, HashAlg.SHA384: 48}


@dataclass(frozen=True, repr=False)
class PSK:
    serial: int
    identity: bytes
    key: bytes = field(repr=False)
    hash_alg: HashAlg

    def __repr__(self) -> str:
        return f"PSK(serial={self.serial}, identity={self.identity!r}, hash={self.hash_alg.name})"

    @property
    def suite(self) -> bytes:
        return _psk.SUITE_SHA384 if self.hash_alg is HashAlg.SHA384 else _psk.SUITE_SHA256


def hash_for(identity: str, key_len: int) -> HashAlg:
    """The PSK hash: from an NVMe identity's hash field, else from the key length."""
    match = _NVME_IDENTITY.match(identity)
    if match is None:
        return HashAlg.SHA384 if key_len == 48 else HashAlg.SHA256
    alg = {"01": HashAlg.SHA256, "02": HashAlg.SHA384}.get(match.group(3))
    if alg is None:
        raise CredentialError(f"PSK {identity!r}: unknown hash field {match.group(3)}",
                              status=errno.EINVAL)
    if key_len != _KEY_LEN[alg]:
        raise CredentialError(f"PSK {identity!r}: {key_len}-byte key for {alg.name}",
                              status=errno.EKEYREJECTED)
    return alg


def load_psk(serial: int) -> PSK:
    """A PSK by serial: its description is the identity, its payload the key."""
    desc = keyring.describe_key(serial)
    if desc.key_type not in KEY_TYPES:
        raise CredentialError(f"key {serial} ({desc.description!r}) is a {desc.key_type!r} key, "
                              "not a PSK", status=errno.EKEYREJECTED)
    key = keyring.read_key(serial)
    return PSK(serial, desc.description.encode(), key, hash_for(desc.description, len(key)))


def next_client_psk(serials: Sequence[int]) -> tuple[PSK, tuple[int, ...]]:
    """The first usable of ``serials`` (the ACCEPT's peer identities) and the serials after
    it, for a retry; else the first one's error. An unreadable key is skipped: ktls-utils
    (src/tlshd/client.c, tlshd_tls13_client_psk_handshake_one) stops at it with EIO."""
    if not serials:
        raise CredentialError("PSK request without peer identities", status=errno.EINVAL)
    errors: list[TlshdError] = []
    for index, serial in enumerate(serials):
        try:
            return load_psk(serial), tuple(serials[index + 1:])
        except TlshdError as exc:
            errors.append(exc)
    raise errors[0]


MAX_IDENTITY = 4095  # a key description's limit (KEY_MAX_DESC_SIZE 4096, with its NUL)


def key_description(identity: bytes) -> str | None:
    """The key description an offered identity names, or None if no key can have it: a
    description is a C string, so an identity with a NUL would be looked up cut short (and
    find another identity's key); over-long and non-UTF-8 ones name nothing either."""
    if not identity or len(identity) > MAX_IDENTITY or b"\0" in identity:
        return None
    try:
        return identity.decode("utf-8")
    except UnicodeDecodeError:
        return None


def find_server_psk(identities: Iterable[bytes], keyrings: Sequence[int]) -> PSK | None:
    """The first offered identity that names a key in ``keyrings`` (psk, then user type),
    exactly: see ``key_description``."""
    for identity in identities:
        description = key_description(identity)
        if description is None:
            continue
        for ring in keyrings:
            for key_type in KEY_TYPES:
                try:
                    serial = keyring.search_key(ring, key_type, description)
                except KeyNotFoundError:
                    continue
                except CredentialError:
                    continue  # unknown key type on this kernel, or a keyring we cannot search
                return load_psk(serial)
    return None
