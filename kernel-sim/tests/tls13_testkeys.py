"""TLS 1.3 traffic keys and kTLS crypto_info bytes for the kernel-sim tests.

A test helper, independent of tlshd and of kernel_sim: it derives record keys
from NSS key-log secrets with HKDF-Expand-Label (RFC 8446 section 7.1, 7.3)
and packs ``tls12_crypto_info_*`` itself from the layout in
include/uapi/linux/tls.h (``u16 version, u16 cipher_type``, host order, then
iv, key, salt, rec_seq), so the parser under test is checked against an
independent encoder.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

TLS_1_2_VERSION = 0x0303
TLS_1_3_VERSION = 0x0304


@dataclass(frozen=True)
class Suite:
    """A TLS 1.3 cipher suite and the kTLS cipher that carries it."""

    name: str  # IANA / OpenSSL -ciphersuites name
    cipher_type: int  # TLS_CIPHER_* (include/uapi/linux/tls.h)
    hash_name: str
    key_len: int

    @property
    def hash(self) -> hashes.HashAlgorithm:
        return hashes.SHA384() if self.hash_name == "sha384" else hashes.SHA256()

    @property
    def chacha(self) -> bool:
        return self.cipher_type == 54


SUITES = {
    s.name: s
    for s in (
        Suite("TLS_AES_128_GCM_SHA256", 51, "sha256", 16),
        Suite("TLS_AES_256_GCM_SHA384", 52, "sha384", 32),
        Suite("TLS_AES_128_CCM_SHA256", 53, "sha256", 16),
        Suite("TLS_CHACHA20_POLY1305_SHA256", 54, "sha256", 32),
    )
}


def hkdf_expand_label(
    secret: bytes, label: bytes, context: bytes, length: int, hash_alg: hashes.HashAlgorithm
) -> bytes:
    """HKDF-Expand-Label: HkdfLabel = u16 length || <"tls13 " + label> || <context>."""
    full_label = b"tls13 " + label
    info = struct.pack(">HB", length, len(full_label)) + full_label
    info += bytes([len(context)]) + context
    return HKDFExpand(hash_alg, length, info).derive(secret)


def traffic_key_iv(suite: Suite, secret: bytes) -> tuple[bytes, bytes]:
    """[sender]_write_key and the 12-byte [sender]_write_iv (RFC 8446 section 7.3)."""
    key = hkdf_expand_label(secret, b"key", b"", suite.key_len, suite.hash)
    iv = hkdf_expand_label(secret, b"iv", b"", 12, suite.hash)
    return key, iv


def next_traffic_secret(suite: Suite, secret: bytes) -> bytes:
    """application_traffic_secret_N+1 (RFC 8446 section 7.2)."""
    return hkdf_expand_label(secret, b"traffic upd", b"", suite.hash.digest_size, suite.hash)


def pack_crypto_info(
    version: int, cipher_type: int, iv: bytes, key: bytes, salt: bytes, rec_seq: int
) -> bytes:
    """A ``tls12_crypto_info_*`` struct, byte for byte."""
    return struct.pack("=HH", version, cipher_type) + iv + key + salt + rec_seq.to_bytes(8, "big")


def crypto_info_tls13(suite: Suite, secret: bytes, rec_seq: int = 0) -> bytes:
    """crypto_info for one direction: GCM/CCM split iv12 into salt(4) || iv(8)."""
    key, iv12 = traffic_key_iv(suite, secret)
    if suite.chacha:
        return pack_crypto_info(TLS_1_3_VERSION, suite.cipher_type, iv12, key, b"", rec_seq)
    return pack_crypto_info(TLS_1_3_VERSION, suite.cipher_type, iv12[4:], key, iv12[:4], rec_seq)


def parse_keylog_line(line: bytes) -> tuple[str, bytes]:
    """``LABEL <client_random hex> <secret hex>`` -> (label, secret)."""
    label, _random, secret = line.decode("ascii").split()
    return label, bytes.fromhex(secret)
