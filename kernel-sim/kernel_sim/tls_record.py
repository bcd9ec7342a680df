"""kTLS crypto_info structs and TLS record protection, as net/tls does them (pure).

Also the small pure pieces of the ULP model: socket option values, the
``rx_list`` entry and the ``/proc/net/tls_stat`` counters.

Theory of operation
-------------------
This module is the byte-level half of the kTLS model; :mod:`kernel_sim.tls_ulp`
does the socket I/O. Nothing here touches a socket or a clock: it parses the
``tls12_crypto_info_*`` structs of ``include/uapi/linux/tls.h`` and seals and
opens single records exactly as ``net/tls/tls_sw.c`` does.

crypto_info (``include/uapi/linux/tls.h``): ``u16 version, u16 cipher_type``
in host byte order, then ``iv, key, salt, rec_seq`` with no padding. The checks
follow ``net/tls/tls_main.c`` in the kernel's order: ``do_tls_setsockopt_conf``
rejects ``optlen < sizeof(struct tls_crypto_info)``; ``validate_crypto_info``
rejects an unknown version, ARIA with TLS 1.3 and (given the other direction)
a version/cipher mismatch; then an unknown cipher; then "optlen !=
cipher_desc->crypto_info" -- all EINVAL.

Record protection (``tls_sw.c``: ``tls_push_record``, ``tls_make_aad``,
``tls_fill_prepend``, ``tls_advance_record_sn``, ``tls_decrypt_sg``,
``tls_padding_length``; ``include/net/tls.h``: ``tls_xor_iv_with_seq``):

* The kernel keeps ``cctx->iv = salt || iv`` and ``cctx->rec_seq`` (u64 BE).
* TLS 1.3 and ChaCha20 (1.2 too): nonce = ``(salt || iv) XOR rec_seq``
  (seq right-aligned in 12 bytes); no explicit nonce on the wire.
* TLS 1.2 GCM/CCM: nonce = ``salt || explicit``; on TX the explicit part is
  ``cctx->iv[salt:]``, written after the header and incremented per record
  (``tls_advance_record_sn``); on RX it is read from the record.
* AAD, 1.3: ``23 || 0x0303 || len(ciphertext+tag)``. The kernel builds it
  itself (``tls_make_aad``), it does not copy the received header: a 1.3
  record with another outer type fails authentication.
* AAD, 1.2: ``rec_seq(8) || type || 0x0303 || len(plaintext)``.
* 1.3 inner plaintext = data || content type; the kernel sends no padding. On
  receive, trailing zeros are stripped; "if (offset < prot->prepend_size)
  return -EBADMSG", i.e. an all-zero inner plaintext is EBADMSG.
* Receive framing (``tls_rx_msg_size``): a body longer than
  ``TLS_MAX_PAYLOAD_SIZE + cipher_overhead + tail_size`` is EMSGSIZE (16401
  for 1.3; stricter than RFC 8446's 2^14+256, which no valid 1.3 record can
  reach anyway); shorter than the overhead is EBADMSG; a version other than
  0x0303 ("both TLS1.3 and TLS1.2 use TLS_1_2 version here") is EINVAL.

AEADs come from ``cryptography``: AES-GCM, AES-CCM (16-byte tag, 12-byte
nonce: the kernel's B0 byte 2), ChaCha20-Poly1305, and SM4-GCM through the
generic GCM mode. ``cryptography`` has no ARIA and no generic CCM, so ARIA and
SM4-CCM parse fine but cannot be installed: ``crypto_alloc_aead`` fails with
ENOENT in the kernel when an algorithm is unavailable, and so does
:func:`new_record_cipher` here.
"""

from __future__ import annotations

import enum
import errno
import os
import struct
import threading
from dataclasses import dataclass, field, replace
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESCCM, AESGCM, ChaCha20Poly1305

__all__ = [
    "TCP_ULP_NAME_MAX",
    "TLS_1_2_VERSION",
    "TLS_1_3_VERSION",
    "TLS_HEADER_SIZE",
    "TLS_MAX_PAYLOAD_SIZE",
    "TLS_STAT_NAMES",
    "TLS_TAG_SIZE",
    "CipherDesc",
    "CipherType",
    "CryptoInfo",
    "PlainRecord",
    "RecordCipher",
    "RecordType",
    "TLSStats",
    "cipher_desc",
    "decode_crypto_info_body",
    "decode_crypto_info_header",
    "decode_u32_flag",
    "decode_ulp_name",
    "is_key_update",
    "new_record_cipher",
    "os_error",
    "parse_crypto_info",
    "validate_crypto_info",
]

TLS_1_2_VERSION = 0x0303
TLS_1_3_VERSION = 0x0304
TLS_HEADER_SIZE = 5
TLS_MAX_PAYLOAD_SIZE = 1 << 14
TLS_TAG_SIZE = 16
TLS_HANDSHAKE_KEYUPDATE = 24  # include/net/tls.h, "rfc8446 B.3: Key update"
_REC_SEQ_SIZE = 8
_INFO_HEADER = struct.Struct("=HH")
_U32_FLAG = struct.Struct("=I")
TCP_ULP_NAME_MAX = 16  # include/net/tcp.h  # struct tls_crypto_info: host byte order
_LEGACY_VERSION = b"\x03\x03"


def os_error(code: int) -> OSError:
    """The OSError a syscall failing with ``code`` raises in Python."""
    return OSError(code, os.strerror(code))


class RecordType(enum.IntEnum):
    """TLS ContentType (RFC 8446 section 5.1)."""

    CHANGE_CIPHER_SPEC = 20
    ALERT = 21
    HANDSHAKE = 22
    APPLICATION_DATA = 23


class CipherType(enum.IntEnum):
    """``TLS_CIPHER_*`` from include/uapi/linux/tls.h."""

    AES_GCM_128 = 51
    AES_GCM_256 = 52
    AES_CCM_128 = 53
    CHACHA20_POLY1305 = 54
    SM4_GCM = 55
    SM4_CCM = 56
    ARIA_GCM_128 = 57
    ARIA_GCM_256 = 58


@dataclass(frozen=True)
class CipherDesc:
    """Field sizes of one ``tls12_crypto_info_*`` struct (``struct tls_cipher_desc``)."""

    iv: int
    key: int
    salt: int
    rec_seq: int = _REC_SEQ_SIZE
    tag: int = TLS_TAG_SIZE

    @property
    def crypto_info_size(self) -> int:
        return _INFO_HEADER.size + self.iv + self.key + self.salt + self.rec_seq


_CIPHER_DESCS: dict[CipherType, CipherDesc] = {
    CipherType.AES_GCM_128: CipherDesc(iv=8, key=16, salt=4),
    CipherType.AES_GCM_256: CipherDesc(iv=8, key=32, salt=4),
    CipherType.AES_CCM_128: CipherDesc(iv=8, key=16, salt=4),
    CipherType.CHACHA20_POLY1305: CipherDesc(iv=12, key=32, salt=0),
    CipherType.SM4_GCM: CipherDesc(iv=8, key=16, salt=4),
    CipherType.SM4_CCM: CipherDesc(iv=8, key=16, salt=4),
    CipherType.ARIA_GCM_128: CipherDesc(iv=8, key=16, salt=4),
    CipherType.ARIA_GCM_256: CipherDesc(iv=8, key=32, salt=4),
}


def cipher_desc(cipher: CipherType) -> CipherDesc:
    return _CIPHER_DESCS[cipher]


@dataclass(frozen=True)
class CryptoInfo:
    """A parsed ``tls12_crypto_info_*``; ``repr`` hides the key material."""

    version: int
    cipher: CipherType
    iv: bytes = field(repr=False)
    key: bytes = field(repr=False)
    salt: bytes = field(repr=False)
    rec_seq: bytes

    @property
    def desc(self) -> CipherDesc:
        return _CIPHER_DESCS[self.cipher]

    def to_bytes(self) -> bytes:
        """The struct as ``getsockopt`` copies it out."""
        header = _INFO_HEADER.pack(self.version, self.cipher)
        return header + self.iv + self.key + self.salt + self.rec_seq


def decode_crypto_info_header(optval: bytes) -> tuple[int, int]:
    """``struct tls_crypto_info``; "optlen < sizeof(*crypto_info)" is EINVAL."""
    if len(optval) < _INFO_HEADER.size:
        raise os_error(errno.EINVAL)
    version, cipher = _INFO_HEADER.unpack_from(optval)
    return version, cipher


def validate_crypto_info(version: int, cipher: int, alt: CryptoInfo | None) -> None:
    """``validate_crypto_info()``: version, ARIA only with 1.2, same as the other direction."""
    if version not in (TLS_1_2_VERSION, TLS_1_3_VERSION):
        raise os_error(errno.EINVAL)
    aria = (CipherType.ARIA_GCM_128, CipherType.ARIA_GCM_256)
    if cipher in aria and version != TLS_1_2_VERSION:
        raise os_error(errno.EINVAL)
    if alt is not None and (alt.version, alt.cipher) != (version, cipher):
        raise os_error(errno.EINVAL)


def decode_crypto_info_body(optval: bytes) -> CryptoInfo:
    """Cipher lookup and the exact-size rule; the header was validated already."""
    version, cipher_value = decode_crypto_info_header(optval)
    try:
        cipher = CipherType(cipher_value)
    except ValueError:
        raise os_error(errno.EINVAL) from None
    desc = _CIPHER_DESCS[cipher]
    if len(optval) != desc.crypto_info_size:
        raise os_error(errno.EINVAL)
    fields, offset = [], _INFO_HEADER.size
    for size in (desc.iv, desc.key, desc.salt, desc.rec_seq):
        fields.append(bytes(optval[offset : offset + size]))
        offset += size
    iv, key, salt, rec_seq = fields
    return CryptoInfo(version, cipher, iv=iv, key=key, salt=salt, rec_seq=rec_seq)


def parse_crypto_info(optval: bytes) -> CryptoInfo:
    """Parse a crypto_info struct, raising EINVAL where the kernel would (no other direction)."""
    version, cipher = decode_crypto_info_header(optval)
    validate_crypto_info(version, cipher, None)
    return decode_crypto_info_body(optval)


class _AEAD(Protocol):
    def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes: ...

    def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes: ...


class _SM4GCM:
    """SM4-GCM with the AESGCM calling convention (ciphertext || 16-byte tag)."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes:
        enc = Cipher(algorithms.SM4(self._key), modes.GCM(nonce)).encryptor()
        enc.authenticate_additional_data(associated_data or b"")
        return enc.update(data) + enc.finalize() + enc.tag

    def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes:
        body, tag = data[:-TLS_TAG_SIZE], data[-TLS_TAG_SIZE:]
        dec = Cipher(algorithms.SM4(self._key), modes.GCM(nonce, tag)).decryptor()
        dec.authenticate_additional_data(associated_data or b"")
        return dec.update(body) + dec.finalize()


def _new_aead(cipher: CipherType, key: bytes) -> _AEAD:
    if cipher in (CipherType.AES_GCM_128, CipherType.AES_GCM_256):
        return AESGCM(key)
    if cipher == CipherType.AES_CCM_128:
        return AESCCM(key, tag_length=TLS_TAG_SIZE)
    if cipher == CipherType.CHACHA20_POLY1305:
        return ChaCha20Poly1305(key)
    if cipher == CipherType.SM4_GCM:
        return _SM4GCM(key)
    raise os_error(errno.ENOENT)  # crypto_alloc_aead(): no such algorithm here


class RecordCipher:
    """One direction's ``struct cipher_context`` plus its AEAD: seals or opens records."""

    def __init__(self, info: CryptoInfo, aead: _AEAD) -> None:
        self.info = info
        self._aead = aead
        self._iv = bytearray(info.salt + info.iv)  # cctx->iv = salt || iv
        self.seq = int.from_bytes(info.rec_seq, "big")

    @property
    def tls13(self) -> bool:
        return self.info.version == TLS_1_3_VERSION

    @property
    def explicit_nonce(self) -> bool:
        """TLS 1.2 GCM/CCM carry an 8-byte explicit nonce; 1.3 and ChaCha20 do not."""
        return not self.tls13 and self.info.cipher != CipherType.CHACHA20_POLY1305

    @property
    def overhead(self) -> int:
        """``cipher_overhead`` of tls_rx_msg_size: tag, plus the explicit nonce."""
        return TLS_TAG_SIZE + (self.info.desc.iv if self.explicit_nonce else 0)

    def check_header(self, header: bytes) -> int:
        """``tls_rx_msg_size``: validate a 5-byte header, return the body length."""
        length = int.from_bytes(header[3:5], "big")
        tail = 1 if self.tls13 else 0
        if length > TLS_MAX_PAYLOAD_SIZE + self.overhead + tail:
            raise os_error(errno.EMSGSIZE)
        if length < self.overhead:
            raise os_error(errno.EBADMSG)
        if header[1:3] != _LEGACY_VERSION:
            raise os_error(errno.EINVAL)
        return length

    def seal(self, record_type: int, plaintext: bytes) -> bytes:
        """One whole record (header included); advances the sequence number."""
        if self.tls13:
            record = self._seal13(record_type, plaintext)
        else:
            record = self._seal12(record_type, plaintext)
        self._advance()
        return record

    def open(self, header: bytes, body: bytes) -> tuple[int, bytes, bool]:
        """Decrypt one record: (content type, plaintext, had padding). EBADMSG on failure."""
        if self.tls13:
            rtype, plaintext, padded = self._open13(body)
        else:
            rtype, plaintext, padded = header[0], self._open12(header[0], body), False
        self._advance()
        return rtype, plaintext, padded

    def current_info(self) -> CryptoInfo:
        """``do_tls_getsockopt_conf``: the struct with the live iv and rec_seq."""
        salt = self.info.desc.salt
        seq = self.seq.to_bytes(_REC_SEQ_SIZE, "big")
        return replace(self.info, iv=bytes(self._iv[salt:]), rec_seq=seq)

    def _xor_nonce(self) -> bytes:
        return (int.from_bytes(self._iv, "big") ^ self.seq).to_bytes(len(self._iv), "big")

    def _aad12(self, record_type: int, length: int) -> bytes:
        seq = self.seq.to_bytes(_REC_SEQ_SIZE, "big")
        return seq + bytes([record_type]) + _LEGACY_VERSION + length.to_bytes(2, "big")

    def _seal13(self, record_type: int, plaintext: bytes) -> bytes:
        inner = plaintext + bytes([record_type])
        header = bytes([RecordType.APPLICATION_DATA]) + _LEGACY_VERSION
        header += (len(inner) + TLS_TAG_SIZE).to_bytes(2, "big")
        return header + self._aead.encrypt(self._xor_nonce(), inner, header)

    def _seal12(self, record_type: int, plaintext: bytes) -> bytes:
        aad = self._aad12(record_type, len(plaintext))
        if self.explicit_nonce:
            explicit = bytes(self._iv[self.info.desc.salt :])
            body = explicit + self._aead.encrypt(bytes(self._iv), plaintext, aad)
        else:
            body = self._aead.encrypt(self._xor_nonce(), plaintext, aad)
        header = bytes([record_type]) + _LEGACY_VERSION + len(body).to_bytes(2, "big")
        return header + body

    def _open13(self, body: bytes) -> tuple[int, bytes, bool]:
        aad = bytes([RecordType.APPLICATION_DATA]) + _LEGACY_VERSION
        aad += len(body).to_bytes(2, "big")
        inner = self._decrypt(self._xor_nonce(), body, aad)
        stripped = inner.rstrip(b"\x00")
        if not stripped:  # tls_padding_length: no content type before the header
            raise os_error(errno.EBADMSG)
        return stripped[-1], stripped[:-1], len(stripped) != len(inner)

    def _open12(self, record_type: int, body: bytes) -> bytes:
        if self.explicit_nonce:
            salt, ivlen = self.info.desc.salt, self.info.desc.iv
            nonce, body = bytes(self._iv[:salt]) + body[:ivlen], body[ivlen:]
        else:
            nonce = self._xor_nonce()
        aad = self._aad12(record_type, len(body) - TLS_TAG_SIZE)
        return self._decrypt(nonce, body, aad)

    def _decrypt(self, nonce: bytes, body: bytes, aad: bytes) -> bytes:
        try:
            return self._aead.decrypt(nonce, body, aad)
        except InvalidTag:
            raise os_error(errno.EBADMSG) from None

    def _advance(self) -> None:
        """``tls_advance_record_sn``: rec_seq, and for 1.2 GCM/CCM the explicit IV too."""
        self.seq = (self.seq + 1) % (1 << 64)
        if self.explicit_nonce:
            salt = self.info.desc.salt
            value = (int.from_bytes(self._iv[salt:], "big") + 1) % (1 << 64)
            self._iv[salt:] = value.to_bytes(len(self._iv) - salt, "big")


def new_record_cipher(info: CryptoInfo) -> RecordCipher:
    """``tls_set_sw_offload`` for one direction; ENOENT when the AEAD is unavailable."""
    return RecordCipher(info, _new_aead(info.cipher, info.key))


def is_key_update(record_type: int, plaintext: bytes) -> bool:
    """``tls_check_pending_rekey``: a handshake record whose first byte is KeyUpdate (24)."""
    return record_type == RecordType.HANDSHAKE and plaintext[:1] == bytes([TLS_HANDSHAKE_KEYUPDATE])


@dataclass
class PlainRecord:
    """A decrypted record waiting in ``rx_list``."""

    rtype: int
    data: bytes
    offset: int = 0

    def take(self, size: int) -> bytes:
        chunk = self.data[self.offset : self.offset + size]
        self.offset += len(chunk)
        return chunk

    @property
    def drained(self) -> bool:
        return self.offset >= len(self.data)


# --- socket option values (pure decoding) -----------------------------------------


def decode_u32_flag(optval: bytes, *, exact: bool) -> bool:
    """A u32 0/1 option: exact length (TX_ZEROCOPY_RO) or longer with zero tail (NO_PAD)."""
    if len(optval) < _U32_FLAG.size or (exact and len(optval) != _U32_FLAG.size):
        raise os_error(errno.EINVAL)
    (value,) = _U32_FLAG.unpack_from(optval)
    if value > 1 or any(optval[_U32_FLAG.size :]):
        raise os_error(errno.EINVAL)
    return bool(value)


def decode_ulp_name(optval: bytes) -> bytes:
    """``do_tcp_setsockopt(TCP_ULP)``: at most TCP_ULP_NAME_MAX - 1 bytes, up to a NUL."""
    if len(optval) < 1:
        raise os_error(errno.EINVAL)
    return bytes(optval[: TCP_ULP_NAME_MAX - 1]).split(b"\0", 1)[0]


# --- /proc/net/tls_stat --------------------------------------------------------------

# /proc/net/tls_stat, in the order of net/tls/tls_proc.c (include/uapi/linux/snmp.h).
TLS_STAT_NAMES = (
    "TlsCurrTxSw",
    "TlsCurrRxSw",
    "TlsCurrTxDevice",
    "TlsCurrRxDevice",
    "TlsTxSw",
    "TlsRxSw",
    "TlsTxDevice",
    "TlsRxDevice",
    "TlsDecryptError",
    "TlsRxDeviceResync",
    "TlsDecryptRetry",
    "TlsRxNoPadViolation",
    "TlsRxRekeyOk",
    "TlsRxRekeyError",
    "TlsTxRekeyOk",
    "TlsTxRekeyError",
    "TlsRxRekeyReceived",
)


class TLSStats:
    """One netns's ``tls_statistics``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values = dict.fromkeys(TLS_STAT_NAMES, 0)

    def add(self, name: str, delta: int = 1) -> None:
        with self._lock:
            self._values[name] += delta

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)
