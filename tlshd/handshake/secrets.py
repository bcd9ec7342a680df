"""TLS 1.3 traffic secrets and the keys derived from them (pure: bytes in, bytes out).

Theory of operation
-------------------
OpenSSL runs the handshake; we never see its key schedule. What it does give
us is the NSS key-log line for every secret it derives (the keylog callback):

    CLIENT_TRAFFIC_SECRET_0 <client_random hex> <secret hex>

A :class:`SecretCollector` gathers those lines for one connection and hands
out the two ``*_application_traffic_secret_0`` values: our own (TX) and the
peer's (RX). From a traffic secret, RFC 8446 section 7.3 derives the record
protection key and IV with HKDF-Expand-Label; ``ktls`` turns those into the
kernel's ``tls12_crypto_info_*`` structs. KeyUpdate (RFC 8446 section 7.2)
moves a secret to the next generation with the label "traffic upd".

Secrets never leave this module in printable form: every class that holds
key material has a ``repr`` that shows lengths and labels only, and no
exception message or chained exception carries input bytes (a malformed
key-log line may contain a secret, so error messages describe the problem,
never the line).
"""

from __future__ import annotations

import enum
import errno
import re
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from tlshd.errors import DecodeError, LocalError

__all__ = [
    "CLIENT_TRAFFIC_SECRET_0",
    "SERVER_TRAFFIC_SECRET_0",
    "TLS13_IV_LEN",
    "HashAlg",
    "KeylogEntry",
    "MissingSecretError",
    "Role",
    "SecretCollector",
    "TrafficKeys",
    "derive_traffic_keys",
    "encode_hkdf_label",
    "hkdf_expand_label",
    "next_traffic_secret",
    "parse_keylog_line",
]

# RFC 8446 section 5.3: "iv_length ... set to max(8 bytes, N_MIN)" = 12 for all
# TLS 1.3 AEADs in use.
TLS13_IV_LEN = 12

# NSS key-log labels (as OpenSSL writes them) for the application secrets.
CLIENT_TRAFFIC_SECRET_0 = "CLIENT_TRAFFIC_SECRET_0"
SERVER_TRAFFIC_SECRET_0 = "SERVER_TRAFFIC_SECRET_0"

_LABEL_PREFIX = b"tls13 "
_MAX_U8 = 0xFF
_MAX_U16 = 0xFFFF


class HashAlg(enum.Enum):
    """The hash of a TLS 1.3 cipher suite (RFC 8446 appendix B.4)."""

    SHA256 = "sha256"
    SHA384 = "sha384"

    @property
    def digest_size(self) -> int:
        """Hash.length in RFC 8446: the size of every secret of the suite."""
        return self.hash_object().digest_size

    def hash_object(self) -> hashes.HashAlgorithm:
        """A fresh ``cryptography`` hash instance for HKDF."""
        if self is HashAlg.SHA256:
            return hashes.SHA256()
        return hashes.SHA384()


class Role(enum.Enum):
    """Which end of the TLS connection this agent plays (the engine's role too)."""

    CLIENT = "client"
    SERVER = "server"


class MissingSecretError(LocalError):
    """OpenSSL finished a handshake without logging a secret we need."""

    status = errno.EIO


# --- HKDF-Expand-Label (RFC 8446 section 7.1) --------------------------------


def encode_hkdf_label(label: bytes, context: bytes, length: int) -> bytes:
    """The HkdfLabel struct: u16 length, opaque label<7..255>, opaque context<0..255>.

    RFC 8446 section 7.1: ``label = "tls13 " + Label``.
    """
    full_label = _LABEL_PREFIX + label
    if not 7 <= len(full_label) <= _MAX_U8:
        raise ValueError(f"HKDF label must be 1..249 bytes, not {len(label)}")
    if len(context) > _MAX_U8:
        raise ValueError(f"HKDF context must be at most 255 bytes, not {len(context)}")
    if not 0 < length <= _MAX_U16:
        raise ValueError(f"HKDF output length must be 1..65535, not {length}")
    return (
        struct.pack("!HB", length, len(full_label))
        + full_label
        + struct.pack("!B", len(context))
        + context
    )


def hkdf_expand_label(
    alg: HashAlg, secret: bytes, label: bytes, context: bytes, length: int
) -> bytes:
    """HKDF-Expand-Label(Secret, Label, Context, Length) from RFC 8446 section 7.1."""
    if not secret:
        raise ValueError("HKDF-Expand-Label needs a non-empty secret")
    if length > 255 * alg.digest_size:
        raise ValueError(f"HKDF output length {length} too long for {alg.name}")
    info = encode_hkdf_label(label, context, length)
    return HKDFExpand(algorithm=alg.hash_object(), length=length, info=info).derive(secret)


def _check_secret(alg: HashAlg, secret: bytes) -> None:
    # Every TLS 1.3 traffic secret is Hash.length bytes; a mismatch means the
    # suite and the secret belong to different connections or suites.
    if len(secret) != alg.digest_size:
        raise ValueError(
            f"{alg.name} traffic secret must be {alg.digest_size} bytes, not {len(secret)}"
        )


# --- traffic keys (RFC 8446 sections 7.2 and 7.3) ----------------------------


@dataclass(frozen=True, repr=False)
class TrafficKeys:
    """The AEAD key and the 12-byte write IV of one direction."""

    key: bytes
    iv: bytes

    def __post_init__(self) -> None:
        if len(self.iv) != TLS13_IV_LEN:
            raise ValueError(f"TLS 1.3 IV must be {TLS13_IV_LEN} bytes, not {len(self.iv)}")

    def __repr__(self) -> str:
        return f"TrafficKeys(key=<{len(self.key)} bytes>, iv=<{len(self.iv)} bytes>)"


def derive_traffic_keys(alg: HashAlg, secret: bytes, key_len: int) -> TrafficKeys:
    """RFC 8446 section 7.3: ``[sender]_write_key`` and ``[sender]_write_iv``."""
    _check_secret(alg, secret)
    return TrafficKeys(
        key=hkdf_expand_label(alg, secret, b"key", b"", key_len),
        iv=hkdf_expand_label(alg, secret, b"iv", b"", TLS13_IV_LEN),
    )


def next_traffic_secret(alg: HashAlg, secret: bytes) -> bytes:
    """RFC 8446 section 7.2: ``application_traffic_secret_N+1``.

    "HKDF-Expand-Label(application_traffic_secret_N, "traffic upd", "", Hash.length)"
    """
    _check_secret(alg, secret)
    return hkdf_expand_label(alg, secret, b"traffic upd", b"", alg.digest_size)


# --- key-log lines ------------------------------------------------------------

CLIENT_RANDOM_LEN = 32
# Largest value we accept in the third field. Traffic secrets are at most 48
# bytes; other labels OpenSSL may log (ECH_CONFIG) carry longer values.
MAX_KEYLOG_VALUE_LEN = 1024

_KEYLOG_LINE = re.compile(
    rb"([A-Z][A-Z0-9_]{0,63}) ([0-9a-fA-F]{64}) ((?:[0-9a-fA-F]{2}){1,%d})\r?\n?"
    % MAX_KEYLOG_VALUE_LEN
)


@dataclass(frozen=True, repr=False)
class KeylogEntry:
    """One NSS key-log line: ``label`` (public), ``client_random``, ``secret``."""

    label: str
    client_random: bytes
    secret: bytes

    def __repr__(self) -> str:
        return (
            f"KeylogEntry(label={self.label!r}, client_random=<{len(self.client_random)} bytes>, "
            f"secret=<{len(self.secret)} bytes>)"
        )


def parse_keylog_line(line: bytes) -> KeylogEntry:
    """Parse ``LABEL <64 hex digits> <hex>``, as OpenSSL's keylog callback passes it.

    One trailing newline is tolerated (key-log files). Anything else raises
    DecodeError whose message does not quote the line.
    """
    match = _KEYLOG_LINE.fullmatch(line)
    if match is None:
        raise DecodeError(_describe_bad_line(line))
    label, client_random, secret = match.groups()
    return KeylogEntry(
        label=label.decode("ascii"),
        client_random=bytes.fromhex(client_random.decode("ascii")),
        secret=bytes.fromhex(secret.decode("ascii")),
    )


def _describe_bad_line(line: bytes) -> str:
    # Says what is wrong without echoing any of the (possibly secret) input.
    fields = line.rstrip(b"\r\n").split(b" ")
    if len(fields) != 3:
        return f"keylog line: expected 3 space-separated fields, got {len(fields)}"
    label, client_random, _secret = fields
    if re.fullmatch(rb"[A-Z][A-Z0-9_]{0,63}", label) is None:
        return "keylog line: the label is not an upper-case NSS key-log label"
    if re.fullmatch(rb"[0-9a-fA-F]{64}", client_random) is None:
        return "keylog line: the client random is not 64 hex digits"
    return f"keylog line: the secret is not 1..{MAX_KEYLOG_VALUE_LEN} bytes of hex"


class SecretCollector:
    """Collects one connection's key-log entries; answers the application secrets.

    Feed it from the keylog callback with :meth:`add_line`. All entries must
    carry the same client random (one collector per connection).
    """

    __slots__ = ("_client_random", "_entries")

    def __init__(self) -> None:
        self._entries: dict[str, KeylogEntry] = {}
        self._client_random: bytes | None = None

    def __repr__(self) -> str:
        return f"SecretCollector(labels={sorted(self._entries)!r})"

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def labels(self) -> frozenset[str]:
        """The labels seen so far (names only, never values)."""
        return frozenset(self._entries)

    def add_line(self, line: bytes) -> KeylogEntry:
        """Parse and keep one key-log line; raises DecodeError if malformed."""
        entry = parse_keylog_line(line)
        self.add(entry)
        return entry

    def add(self, entry: KeylogEntry) -> None:
        """Keep an entry; a repeat is ignored, a conflicting one raises DecodeError."""
        if self._client_random is None:
            self._client_random = entry.client_random
        elif entry.client_random != self._client_random:
            raise DecodeError(f"keylog {entry.label}: client random of another connection")
        known = self._entries.get(entry.label)
        if known is not None and known.secret != entry.secret:
            raise DecodeError(f"keylog {entry.label}: logged twice with different values")
        self._entries[entry.label] = entry

    def application_secrets(self, role: Role) -> tuple[bytes, bytes]:
        """(TX, RX) application traffic secrets for ``role``.

        Client TX is CLIENT_TRAFFIC_SECRET_0, server TX is SERVER_TRAFFIC_SECRET_0;
        RX is the other one.
        """
        client = self._secret(CLIENT_TRAFFIC_SECRET_0)
        server = self._secret(SERVER_TRAFFIC_SECRET_0)
        return (client, server) if role is Role.CLIENT else (server, client)

    def _secret(self, label: str) -> bytes:
        entry = self._entries.get(label)
        if entry is None:
            have = ", ".join(sorted(self._entries)) or "nothing"
            raise MissingSecretError(f"keylog has no {label} (have: {have})")
        return entry.secret
