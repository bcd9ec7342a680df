"""kTLS: build the kernel's crypto_info structs and install them on a socket.

Theory of operation
-------------------
After a TLS 1.3 handshake the kernel takes over record protection when user
space does three setsockopt calls on the TCP socket (include/uapi/linux/tls.h,
Documentation/networking/tls.rst):

1. ``setsockopt(fd, SOL_TCP, TCP_ULP, "tls\\0")`` attaches the TLS ULP. The
   socket must be ESTABLISHED (ENOTCONN otherwise), the ULP must not be set
   yet (EEXIST), and the ``tls`` module must be loadable (ENOENT).
2. ``setsockopt(fd, SOL_TLS, TLS_TX, crypto_info)`` with our own keys.
3. ``setsockopt(fd, SOL_TLS, TLS_RX, crypto_info)`` with the peer's keys.

``crypto_info`` is one of the ``tls12_crypto_info_*`` structs (the "12" is
historic; TLS 1.3 uses them too): ``u16 version, u16 cipher_type`` in host
byte order, then the byte arrays iv, key, salt, rec_seq with no padding.
"optlen must equal the exact struct size for the cipher". For TLS 1.3 the
12-byte write IV is split: GCM/CCM put ``iv12[:4]`` in ``salt`` and
``iv12[4:]`` in ``iv``; ChaCha20-Poly1305 has a 12-byte ``iv`` and no salt.
The kernel forms each nonce as ``(salt || iv) XOR rec_seq`` (RFC 8446 section
5.3), with ``rec_seq`` the big-endian count of records already protected
under this secret.

Everything above :func:`install_ktls` is pure. The I/O goes through a
:class:`SockoptPort` so the worker can be tested against kernel-sim; the real
port is :class:`KernelSockopt`. Error messages name the failing step and the
errno, never key bytes.
"""

from __future__ import annotations

import enum
import errno
import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from tlshd.errors import KTLSInstallError, UnsupportedRequestError
from tlshd.handshake.secrets import HashAlg, TrafficKeys, derive_traffic_keys

__all__ = [
    "SOL_TCP",
    "SOL_TLS",
    "TCP_ULP",
    "TLS_1_2_VERSION",
    "TLS_1_3_VERSION",
    "TLS_CIPHER_AES_CCM_128",
    "TLS_CIPHER_AES_GCM_128",
    "TLS_CIPHER_AES_GCM_256",
    "TLS_CIPHER_ARIA_GCM_128",
    "TLS_CIPHER_ARIA_GCM_256",
    "TLS_CIPHER_CHACHA20_POLY1305",
    "TLS_CIPHER_SM4_CCM",
    "TLS_CIPHER_SM4_GCM",
    "TLS_RX",
    "TLS_TX",
    "TLS_ULP_NAME",
    "CipherSuite",
    "CryptoInfoLayout",
    "KTLSParams",
    "KernelSockopt",
    "SockoptPort",
    "build_crypto_info",
    "crypto_info_layout",
    "crypto_info_size",
    "install_ktls",
    "ktls_params_from_secrets",
    "suite_from_openssl_name",
]

# --- constants (include/linux/socket.h, include/uapi/linux/{tcp,tls}.h) -----

SOL_TLS = 282
SOL_TCP = 6
TCP_ULP = 31
TLS_TX = 1
TLS_RX = 2
# The ULP name as ktls-utils passes it: four bytes, NUL included.
TLS_ULP_NAME = b"tls\0"

TLS_1_2_VERSION = 0x0303
TLS_1_3_VERSION = 0x0304

TLS_CIPHER_AES_GCM_128 = 51
TLS_CIPHER_AES_GCM_256 = 52
TLS_CIPHER_AES_CCM_128 = 53
TLS_CIPHER_CHACHA20_POLY1305 = 54
TLS_CIPHER_SM4_GCM = 55
TLS_CIPHER_SM4_CCM = 56
TLS_CIPHER_ARIA_GCM_128 = 57
TLS_CIPHER_ARIA_GCM_256 = 58

_REC_SEQ_SIZE = 8
_HEADER = struct.Struct("=HH")  # struct tls_crypto_info: version, cipher_type (host order)
_MAX_REC_SEQ = 2**64 - 1


@dataclass(frozen=True)
class CryptoInfoLayout:
    """Field sizes of one ``tls12_crypto_info_*`` struct; offsets follow from them."""

    cipher_type: int
    iv_size: int
    key_size: int
    salt_size: int
    rec_seq_size: int = _REC_SEQ_SIZE

    @property
    def iv_offset(self) -> int:
        return _HEADER.size

    @property
    def key_offset(self) -> int:
        return self.iv_offset + self.iv_size

    @property
    def salt_offset(self) -> int:
        return self.key_offset + self.key_size

    @property
    def rec_seq_offset(self) -> int:
        return self.salt_offset + self.salt_size

    @property
    def size(self) -> int:
        """sizeof(struct tls12_crypto_info_*): the exact optlen the kernel wants."""
        return self.rec_seq_offset + self.rec_seq_size


_LAYOUTS = {
    layout.cipher_type: layout
    for layout in (
        CryptoInfoLayout(TLS_CIPHER_AES_GCM_128, iv_size=8, key_size=16, salt_size=4),
        CryptoInfoLayout(TLS_CIPHER_AES_GCM_256, iv_size=8, key_size=32, salt_size=4),
        CryptoInfoLayout(TLS_CIPHER_AES_CCM_128, iv_size=8, key_size=16, salt_size=4),
        CryptoInfoLayout(TLS_CIPHER_CHACHA20_POLY1305, iv_size=12, key_size=32, salt_size=0),
        CryptoInfoLayout(TLS_CIPHER_SM4_GCM, iv_size=8, key_size=16, salt_size=4),
        CryptoInfoLayout(TLS_CIPHER_SM4_CCM, iv_size=8, key_size=16, salt_size=4),
        CryptoInfoLayout(TLS_CIPHER_ARIA_GCM_128, iv_size=8, key_size=16, salt_size=4),
        CryptoInfoLayout(TLS_CIPHER_ARIA_GCM_256, iv_size=8, key_size=32, salt_size=4),
    )
}


def crypto_info_layout(cipher_type: int) -> CryptoInfoLayout:
    """The struct layout for a ``TLS_CIPHER_*`` number; unknown ones raise."""
    layout = _LAYOUTS.get(cipher_type)
    if layout is None:
        raise UnsupportedRequestError(f"kTLS has no cipher type {cipher_type}")
    return layout


def crypto_info_size(cipher_type: int) -> int:
    """sizeof the ``tls12_crypto_info_*`` struct for ``cipher_type``."""
    return crypto_info_layout(cipher_type).size


# --- TLS 1.3 cipher suites kTLS can take ------------------------------------


@dataclass(frozen=True)
class _SuiteInfo:
    openssl_name: str
    cipher_type: int
    key_len: int
    hash_alg: HashAlg


class CipherSuite(enum.Enum):
    """TLS 1.3 suites with a kTLS cipher; the value is the IANA code point.

    TLS_AES_128_CCM_8_SHA256 (0x1305) is absent on purpose: the kernel has no
    8-byte-tag cipher (all kTLS tags are 16 bytes).
    """

    TLS_AES_128_GCM_SHA256 = 0x1301
    TLS_AES_256_GCM_SHA384 = 0x1302
    TLS_CHACHA20_POLY1305_SHA256 = 0x1303
    TLS_AES_128_CCM_SHA256 = 0x1304

    @property
    def code_point(self) -> int:
        return int(self.value)

    @property
    def openssl_name(self) -> str:
        """What ``SSL.Connection.get_cipher_name()`` returns (the RFC name)."""
        return _SUITES[self].openssl_name

    @property
    def cipher_type(self) -> int:
        """The kernel's ``TLS_CIPHER_*`` number."""
        return _SUITES[self].cipher_type

    @property
    def key_len(self) -> int:
        return _SUITES[self].key_len

    @property
    def hash_alg(self) -> HashAlg:
        return _SUITES[self].hash_alg


_SUITES = {
    CipherSuite.TLS_AES_128_GCM_SHA256: _SuiteInfo(
        "TLS_AES_128_GCM_SHA256", TLS_CIPHER_AES_GCM_128, 16, HashAlg.SHA256
    ),
    CipherSuite.TLS_AES_256_GCM_SHA384: _SuiteInfo(
        "TLS_AES_256_GCM_SHA384", TLS_CIPHER_AES_GCM_256, 32, HashAlg.SHA384
    ),
    CipherSuite.TLS_CHACHA20_POLY1305_SHA256: _SuiteInfo(
        "TLS_CHACHA20_POLY1305_SHA256", TLS_CIPHER_CHACHA20_POLY1305, 32, HashAlg.SHA256
    ),
    CipherSuite.TLS_AES_128_CCM_SHA256: _SuiteInfo(
        "TLS_AES_128_CCM_SHA256", TLS_CIPHER_AES_CCM_128, 16, HashAlg.SHA256
    ),
}
_BY_OPENSSL_NAME = {info.openssl_name: suite for suite, info in _SUITES.items()}


def suite_from_openssl_name(name: str) -> CipherSuite:
    """Map OpenSSL's negotiated cipher name to a kTLS-capable suite, or raise."""
    suite = _BY_OPENSSL_NAME.get(name)
    if suite is None:
        raise UnsupportedRequestError(f"cipher suite {name!r} cannot be offloaded to kTLS")
    return suite


# --- crypto_info builders -----------------------------------------------------


def build_crypto_info(suite: CipherSuite, keys: TrafficKeys, rec_seq: int = 0) -> bytes:
    """The exact ``tls12_crypto_info_*`` bytes for TLS 1.3 under ``suite``."""
    layout = crypto_info_layout(suite.cipher_type)
    if len(keys.key) != layout.key_size:
        raise ValueError(f"{suite.name} needs a {layout.key_size}-byte key, not {len(keys.key)}")
    if not 0 <= rec_seq <= _MAX_REC_SEQ:
        raise ValueError(f"record sequence number out of range: {rec_seq}")
    # iv12 = salt || iv: the kernel glues them back together for the nonce.
    salt, iv = keys.iv[: layout.salt_size], keys.iv[layout.salt_size :]
    return b"".join(
        (
            _HEADER.pack(TLS_1_3_VERSION, layout.cipher_type),
            iv,
            keys.key,
            salt,
            rec_seq.to_bytes(layout.rec_seq_size, "big"),
        )
    )


@dataclass(frozen=True, repr=False)
class KTLSParams:
    """Everything ``install_ktls`` needs: the TX and RX structs, ready to pass."""

    suite: CipherSuite
    tx_crypto_info: bytes
    rx_crypto_info: bytes
    tx_rec_seq: int = 0
    rx_rec_seq: int = 0

    def __repr__(self) -> str:
        return (
            f"KTLSParams(suite={self.suite.name}, tx_rec_seq={self.tx_rec_seq}, "
            f"rx_rec_seq={self.rx_rec_seq}, tx_crypto_info=<{len(self.tx_crypto_info)} bytes>, "
            f"rx_crypto_info=<{len(self.rx_crypto_info)} bytes>)"
        )


def ktls_params_from_secrets(
    suite: CipherSuite, tx_secret: bytes, rx_secret: bytes, tx_seq: int = 0, rx_seq: int = 0
) -> KTLSParams:
    """Derive both directions' keys (RFC 8446 section 7.3) and build the structs."""
    tx_keys = derive_traffic_keys(suite.hash_alg, tx_secret, suite.key_len)
    rx_keys = derive_traffic_keys(suite.hash_alg, rx_secret, suite.key_len)
    return KTLSParams(
        suite=suite,
        tx_crypto_info=build_crypto_info(suite, tx_keys, tx_seq),
        rx_crypto_info=build_crypto_info(suite, rx_keys, rx_seq),
        tx_rec_seq=tx_seq,
        rx_rec_seq=rx_seq,
    )


# --- the I/O edge -------------------------------------------------------------


class SockoptPort(Protocol):
    """setsockopt on a file descriptor; raises OSError with the kernel's errno."""

    def setsockopt(self, fd: int, level: int, optname: int, value: bytes) -> None: ...


class BatchSockoptPort(Protocol):
    """Several setsockopt calls in one go, in order: one round trip where a round trip
    costs (a monitor, kernel-sim), one dup of the fd for the real kernel. The first that
    fails raises :class:`BatchSockoptError`; the ones after it are not made (kernel-sim,
    like a netlink batch, still runs them: they then fail on the half-set socket, which
    DONE's error status makes the consumer close)."""

    def setsockopts(self, fd: int, steps: Sequence[tuple[int, int, bytes]]) -> None: ...


class BatchSockoptError(Exception):
    """Step ``index`` of a batch failed with ``error`` (an OSError with the kernel's errno)."""

    def __init__(self, index: int, error: OSError) -> None:
        super().__init__(str(error))
        self.index, self.error = index, error


class KernelSockopt:
    """The real kernel, for an fd this process holds but does not own.

    We ``dup`` the fd and wrap the duplicate in a ``socket.socket``: socket
    options live on the open file description both descriptors share, so
    setting them through the duplicate configures the caller's socket, and
    closing the duplicate only drops our reference (no FIN, the caller's fd
    stays open). This keeps the fd's ownership with the caller even if we
    raise, and errors arrive as ordinary OSError with ``errno`` set, with no
    ctypes or libc lookup. The price is a few extra syscalls per handshake.
    """

    def setsockopt(self, fd: int, level: int, optname: int, value: bytes) -> None:
        dup = os.dup(fd)
        try:
            sock = socket.socket(fileno=dup)
        except OSError:
            os.close(dup)
            raise
        with sock:
            sock.setsockopt(level, optname, value)

    def setsockopts(self, fd: int, steps: Sequence[tuple[int, int, bytes]]) -> None:
        """The steps through one duplicate."""
        try:
            dup = os.dup(fd)
        except OSError as exc:  # EBADF: the first step fails as setsockopt(2) would
            raise BatchSockoptError(0, exc) from exc
        try:
            sock = socket.socket(fileno=dup)
        except OSError as exc:
            os.close(dup)
            raise BatchSockoptError(0, exc) from exc
        with sock:
            for index, (level, optname, value) in enumerate(steps):
                try:
                    sock.setsockopt(level, optname, value)
                except OSError as exc:
                    raise BatchSockoptError(index, exc) from exc


def install_ktls(port: SockoptPort, fd: int, params: KTLSParams) -> None:
    """Attach the TLS ULP to ``fd`` and install TX then RX keys.

    Any OSError becomes KTLSInstallError whose status is the kernel's errno
    (ENOENT: no ``tls`` module; ENOTCONN: not established; EEXIST: ULP already
    set; EINVAL: struct refused). A failure after TLS_TX leaves the socket half
    configured; the kernel consumer closes it when DONE reports the error.
    """
    steps = (
        ("TCP_ULP", SOL_TCP, TCP_ULP, TLS_ULP_NAME),
        ("TLS_TX", SOL_TLS, TLS_TX, params.tx_crypto_info),
        ("TLS_RX", SOL_TLS, TLS_RX, params.rx_crypto_info),
    )
    batch = getattr(port, "setsockopts", None)  # a BatchSockoptPort (not an isinstance of a
    if batch is not None:                       # runtime protocol: that costs 20 us a call)
        try:
            batch(fd, [(level, optname, value) for _, level, optname, value in steps])
        except BatchSockoptError as exc:
            raise _install_error(steps[exc.index][0], fd, params.suite, exc.error) from exc
        return
    for step, level, optname, value in steps:
        try:
            port.setsockopt(fd, level, optname, value)
        except OSError as exc:
            raise _install_error(step, fd, params.suite, exc) from exc


def _install_error(step: str, fd: int, suite: CipherSuite, exc: OSError) -> KTLSInstallError:
    # Only the step, fd, suite and errno go into the message: never ``value``.
    err = exc.errno if isinstance(exc.errno, int) and 0 < exc.errno <= 4095 else errno.EIO
    name = errno.errorcode.get(err, str(err))
    return KTLSInstallError(
        f"kTLS setsockopt({step}) on fd {fd} for {suite.name} failed: {name} ({os.strerror(err)})",
        status=err,
    )
