"""tlshd.ktls: crypto_info layouts and bytes, suite mapping, and installing them.

Layout numbers here are copied from the reference (section 3.3, compiled
against the 6.12 uapi headers), not computed from tlshd.ktls, so the two are
checked against each other.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tests.vectors import rfc8448 as v
from tlshd import ktls
from tlshd.errors import KTLSInstallError, UnsupportedRequestError
from tlshd.handshake.secrets import HashAlg, TrafficKeys
from tlshd.ktls import (
    SOL_TCP,
    TCP_ULP,
    BatchSockoptError,
    CipherSuite,
    KernelSockopt,
    build_crypto_info,
    crypto_info_layout,
    crypto_info_size,
    install_ktls,
    ktls_params_from_secrets,
    suite_from_openssl_name,
)

GCM128, GCM256, CCM128, CHACHA = 51, 52, 53, 54


def test_constants_have_the_kernel_values() -> None:
    assert (ktls.SOL_TLS, ktls.SOL_TCP, ktls.TCP_ULP) == (282, 6, 31)
    assert (ktls.TLS_TX, ktls.TLS_RX) == (1, 2)
    assert (ktls.TLS_1_2_VERSION, ktls.TLS_1_3_VERSION) == (0x0303, 0x0304)
    assert ktls.TLS_ULP_NAME == b"tls\0"
    assert list(range(51, 59)) == [
        ktls.TLS_CIPHER_AES_GCM_128,
        ktls.TLS_CIPHER_AES_GCM_256,
        ktls.TLS_CIPHER_AES_CCM_128,
        ktls.TLS_CIPHER_CHACHA20_POLY1305,
        ktls.TLS_CIPHER_SM4_GCM,
        ktls.TLS_CIPHER_SM4_CCM,
        ktls.TLS_CIPHER_ARIA_GCM_128,
        ktls.TLS_CIPHER_ARIA_GCM_256,
    ]


# --- layouts -------------------------------------------------------------------

# cipher type: (size, iv @, key @, salt @, rec_seq @) from reference section 3.3
REFERENCE_LAYOUTS = {
    GCM128: (40, 4, 12, 28, 32),
    GCM256: (56, 4, 12, 44, 48),
    CCM128: (40, 4, 12, 28, 32),
    CHACHA: (56, 4, 16, 48, 48),
    55: (40, 4, 12, 28, 32),  # SM4_GCM
    56: (40, 4, 12, 28, 32),  # SM4_CCM
    57: (40, 4, 12, 28, 32),  # ARIA_GCM_128
    58: (56, 4, 12, 44, 48),  # ARIA_GCM_256
}


@pytest.mark.parametrize("cipher_type", sorted(REFERENCE_LAYOUTS))
def test_struct_size_and_field_offsets_match_the_uapi_header(cipher_type: int) -> None:
    layout = crypto_info_layout(cipher_type)
    offsets = (
        layout.size,
        layout.iv_offset,
        layout.key_offset,
        layout.salt_offset,
        layout.rec_seq_offset,
    )
    assert offsets == REFERENCE_LAYOUTS[cipher_type]
    assert crypto_info_size(cipher_type) == REFERENCE_LAYOUTS[cipher_type][0]


@pytest.mark.parametrize("cipher_type", [0, 50, 59, 0x0304, -1])
def test_unknown_cipher_types_are_rejected(cipher_type: int) -> None:
    with pytest.raises(UnsupportedRequestError) as info:
        crypto_info_size(cipher_type)
    assert info.value.status == errno.EINVAL


# --- crypto_info bytes ---------------------------------------------------------------

IV12 = bytes.fromhex("a0a1a2a3a4a5a6a7a8a9aaab")
REC_SEQ = 0x0102030405060708


def header(cipher_type: int) -> bytes:
    # struct tls_crypto_info is two host-order u16s.
    return (0x0304).to_bytes(2, sys.byteorder) + cipher_type.to_bytes(2, sys.byteorder)


# Golden values: key = 00 01 02 ..., iv12 = a0 .. ab, rec_seq = 01 .. 08.
GOLDEN = {
    CipherSuite.TLS_AES_128_GCM_SHA256: header(GCM128)
    + bytes.fromhex(
        "a4a5a6a7a8a9aaab"  # iv = iv12[4:]
        "000102030405060708090a0b0c0d0e0f"  # key
        "a0a1a2a3"  # salt = iv12[:4]
        "0102030405060708"  # rec_seq, big-endian
    ),
    CipherSuite.TLS_AES_256_GCM_SHA384: header(GCM256)
    + bytes.fromhex(
        "a4a5a6a7a8a9aaab"
        "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
        "a0a1a2a3"
        "0102030405060708"
    ),
    CipherSuite.TLS_AES_128_CCM_SHA256: header(CCM128)
    + bytes.fromhex("a4a5a6a7a8a9aaab000102030405060708090a0b0c0d0e0fa0a1a2a30102030405060708"),
    CipherSuite.TLS_CHACHA20_POLY1305_SHA256: header(CHACHA)
    + bytes.fromhex(
        "a0a1a2a3a4a5a6a7a8a9aaab"  # iv = the whole iv12, no salt
        "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
        "0102030405060708"
    ),
}


@pytest.mark.parametrize("suite", list(CipherSuite), ids=lambda s: s.name)
def test_build_crypto_info_is_byte_exact(suite: CipherSuite) -> None:
    keys = TrafficKeys(key=bytes(range(suite.key_len)), iv=IV12)
    info = build_crypto_info(suite, keys, REC_SEQ)
    assert info == GOLDEN[suite]
    assert len(info) == crypto_info_size(suite.cipher_type)


@pytest.mark.parametrize(
    ("rec_seq", "encoded"),
    [
        (0, "0000000000000000"),
        (1, "0000000000000001"),
        (2, "0000000000000002"),
        (0x0100, "0000000000000100"),
        (2**64 - 1, "ffffffffffffffff"),
    ],
)
def test_rec_seq_is_a_big_endian_u64_at_the_end(rec_seq: int, encoded: str) -> None:
    keys = TrafficKeys(key=bytes(16), iv=IV12)
    info = build_crypto_info(CipherSuite.TLS_AES_128_GCM_SHA256, keys, rec_seq)
    assert info[32:40] == bytes.fromhex(encoded)


@pytest.mark.parametrize("rec_seq", [-1, 2**64])
def test_rec_seq_out_of_range_is_rejected(rec_seq: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        build_crypto_info(CipherSuite.TLS_AES_128_GCM_SHA256, TrafficKeys(bytes(16), IV12), rec_seq)


def test_a_key_of_the_wrong_length_is_rejected_without_printing_it() -> None:
    key = bytes(range(0x10, 0x20))
    with pytest.raises(ValueError, match="32-byte key") as info:
        build_crypto_info(CipherSuite.TLS_AES_256_GCM_SHA384, TrafficKeys(key, IV12))
    assert key.hex() not in str(info.value)


def test_build_crypto_info_defaults_rec_seq_to_zero() -> None:
    info = build_crypto_info(CipherSuite.TLS_CHACHA20_POLY1305_SHA256, TrafficKeys(bytes(32), IV12))
    assert info[48:56] == bytes(8)


# --- RFC 8448 records opened the way the kernel would --------------------------------


def kernel_view(crypto_info: bytes) -> tuple[bytes, bytes, int]:
    """AES-128-GCM: (key, salt || iv, rec_seq), using the reference offsets."""
    iv, key, salt, rec_seq = (
        crypto_info[4:12],
        crypto_info[12:28],
        crypto_info[28:32],
        crypto_info[32:40],
    )
    return key, salt + iv, int.from_bytes(rec_seq, "big")


def kernel_open(crypto_info: bytes, record: bytes) -> bytes:
    # tls_sw.c: nonce = (salt || iv) XOR rec_seq (padded left); AAD = record header.
    key, salt_iv, rec_seq = kernel_view(crypto_info)
    nonce = bytes(a ^ b for a, b in zip(salt_iv, rec_seq.to_bytes(12, "big"), strict=True))
    return AESGCM(key).decrypt(nonce, record[5:], record[:5])


def test_rfc8448_server_params_hold_the_rfc_keys_and_open_its_records() -> None:
    # The RFC's server sent one NewSessionTicket before its data: TX rec_seq 1.
    params = ktls_params_from_secrets(
        CipherSuite.TLS_AES_128_GCM_SHA256,
        tx_secret=v.SERVER_AP_TRAFFIC_SECRET,
        rx_secret=v.CLIENT_AP_TRAFFIC_SECRET,
        tx_seq=v.SERVER_AP_RECORD_SEQ,
        rx_seq=v.CLIENT_AP_RECORD_SEQ,
    )
    assert kernel_view(params.tx_crypto_info) == (v.SERVER_AP_KEY, v.SERVER_AP_IV, 1)
    assert kernel_view(params.rx_crypto_info) == (v.CLIENT_AP_KEY, v.CLIENT_AP_IV, 0)
    assert kernel_open(params.tx_crypto_info, v.SERVER_AP_RECORD) == v.APPLICATION_PAYLOAD + b"\x17"
    assert kernel_open(params.rx_crypto_info, v.CLIENT_AP_RECORD) == v.APPLICATION_PAYLOAD + b"\x17"
    assert (params.suite, params.tx_rec_seq, params.rx_rec_seq) == (
        CipherSuite.TLS_AES_128_GCM_SHA256,
        1,
        0,
    )


def test_ktls_params_repr_shows_no_key_material() -> None:
    params = ktls_params_from_secrets(
        CipherSuite.TLS_AES_128_GCM_SHA256, v.SERVER_AP_TRAFFIC_SECRET, v.CLIENT_AP_TRAFFIC_SECRET
    )
    for text in (repr(params), str(params), f"{params}"):
        for secret in (v.SERVER_AP_KEY, v.SERVER_AP_IV, v.CLIENT_AP_KEY, v.SERVER_AP_IV[:4]):
            assert secret.hex() not in text and secret.hex().upper() not in text
        assert repr(params.tx_crypto_info)[2:-1] not in text
    assert repr(params) == (
        "KTLSParams(suite=TLS_AES_128_GCM_SHA256, tx_rec_seq=0, rx_rec_seq=0, "
        "tx_crypto_info=<40 bytes>, rx_crypto_info=<40 bytes>)"
    )


def test_ktls_params_use_the_suite_hash() -> None:
    # A SHA-256-sized secret for a SHA-384 suite is a mix-up, not something to install.
    with pytest.raises(ValueError, match="SHA384"):
        ktls_params_from_secrets(CipherSuite.TLS_AES_256_GCM_SHA384, bytes(32), bytes(32))
    params = ktls_params_from_secrets(CipherSuite.TLS_AES_256_GCM_SHA384, bytes(48), bytes(48))
    assert len(params.tx_crypto_info) == len(params.rx_crypto_info) == 56


# --- suites ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("suite", "code_point", "name", "cipher_type", "key_len", "hash_alg"),
    [
        (
            CipherSuite.TLS_AES_128_GCM_SHA256,
            0x1301,
            "TLS_AES_128_GCM_SHA256",
            51,
            16,
            HashAlg.SHA256,
        ),
        (
            CipherSuite.TLS_AES_256_GCM_SHA384,
            0x1302,
            "TLS_AES_256_GCM_SHA384",
            52,
            32,
            HashAlg.SHA384,
        ),
        (
            CipherSuite.TLS_CHACHA20_POLY1305_SHA256,
            0x1303,
            "TLS_CHACHA20_POLY1305_SHA256",
            54,
            32,
            HashAlg.SHA256,
        ),
        (
            CipherSuite.TLS_AES_128_CCM_SHA256,
            0x1304,
            "TLS_AES_128_CCM_SHA256",
            53,
            16,
            HashAlg.SHA256,
        ),
    ],
)
def test_suite_properties(
    suite: CipherSuite,
    code_point: int,
    name: str,
    cipher_type: int,
    key_len: int,
    hash_alg: HashAlg,
) -> None:
    assert (suite.code_point, suite.openssl_name, suite.cipher_type) == (
        code_point,
        name,
        cipher_type,
    )
    assert (suite.key_len, suite.hash_alg) == (key_len, hash_alg)
    assert suite_from_openssl_name(name) is suite
    assert crypto_info_layout(suite.cipher_type).key_size == key_len


@pytest.mark.parametrize(
    "name",
    [
        "TLS_AES_128_CCM_8_SHA256",  # 8-byte tag: kTLS has no such cipher
        "ECDHE-RSA-AES128-GCM-SHA256",  # TLS 1.2
        "tls_aes_128_gcm_sha256",
        "TLS_SM4_GCM_SM3",
        "",
    ],
)
def test_suites_kTLS_cannot_take_are_rejected(name: str) -> None:
    with pytest.raises(UnsupportedRequestError, match="cannot be offloaded") as info:
        suite_from_openssl_name(name)
    assert info.value.status == errno.EINVAL


# --- install_ktls against a fake port --------------------------------------------------


@dataclass
class FakeSockopt:
    """Records setsockopt calls; fails call number ``fail_at`` with ``error``."""

    fail_at: int = -1
    error: OSError = field(default_factory=lambda: OSError(errno.EINVAL, "Invalid argument"))
    calls: list[tuple[int, int, int, bytes]] = field(default_factory=list)

    def setsockopt(self, fd: int, level: int, optname: int, value: bytes) -> None:
        if len(self.calls) == self.fail_at:
            raise self.error
        self.calls.append((fd, level, optname, value))


PARAMS = ktls_params_from_secrets(
    CipherSuite.TLS_AES_128_GCM_SHA256, v.SERVER_AP_TRAFFIC_SECRET, v.CLIENT_AP_TRAFFIC_SECRET
)


def test_install_sets_the_ulp_then_tx_then_rx() -> None:
    port = FakeSockopt()
    install_ktls(port, 7, PARAMS)
    assert port.calls == [
        (7, 6, 31, b"tls\0"),
        (7, 282, 1, PARAMS.tx_crypto_info),
        (7, 282, 2, PARAMS.rx_crypto_info),
    ]


@pytest.mark.parametrize(
    ("fail_at", "err", "step"),
    [
        (0, errno.ENOENT, "TCP_ULP"),
        (0, errno.ENOTCONN, "TCP_ULP"),
        (0, errno.EEXIST, "TCP_ULP"),
        (0, 524, "TCP_ULP"),  # ENOTSUPP from older kernels
        (1, errno.EINVAL, "TLS_TX"),
        (1, errno.ENOPROTOOPT, "TLS_TX"),
        (2, errno.EBUSY, "TLS_RX"),
        (2, errno.ENOMEM, "TLS_RX"),
    ],
)
def test_an_oserror_becomes_ktls_install_error_with_the_kernel_errno(
    fail_at: int, err: int, step: str
) -> None:
    port = FakeSockopt(fail_at=fail_at, error=OSError(err, os.strerror(err)))
    with pytest.raises(KTLSInstallError) as info:
        install_ktls(port, 9, PARAMS)
    assert info.value.status == err
    assert f"setsockopt({step})" in str(info.value)
    assert "fd 9" in str(info.value)
    assert isinstance(info.value.__cause__, OSError)
    assert len(port.calls) == fail_at  # nothing after the failing step
    for secret in (v.SERVER_AP_KEY, v.CLIENT_AP_KEY, v.SERVER_AP_IV):
        assert secret.hex() not in str(info.value)


@pytest.mark.parametrize("error", [OSError("no errno"), OSError(0, "zero"), OSError(99999, "huge")])
def test_an_oserror_without_a_usable_errno_becomes_eio(error: OSError) -> None:
    with pytest.raises(KTLSInstallError) as info:
        install_ktls(FakeSockopt(fail_at=0, error=error), 3, PARAMS)
    assert info.value.status == errno.EIO


# --- the real kernel ------------------------------------------------------------------------


@contextlib.contextmanager
def loopback_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        with client, server:
            yield client, server


def kernel_has_ktls() -> bool:
    with loopback_pair() as (client, _server):
        try:
            client.setsockopt(socket.IPPROTO_TCP, 31, b"tls\0")
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
    return True


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_real_kernel_without_ktls_reports_enoent_and_leaves_the_socket_alone() -> None:
    if kernel_has_ktls():
        pytest.skip("this kernel has the tls ULP")
    with loopback_pair() as (client, server):
        fds = open_fds()
        with pytest.raises(KTLSInstallError, match=r"setsockopt\(TCP_ULP\).*ENOENT") as info:
            install_ktls(KernelSockopt(), client.fileno(), PARAMS)
        assert info.value.status == errno.ENOENT
        assert open_fds() == fds  # the dup was closed
        client.sendall(b"still ours")  # the caller's fd is open and connected
        assert server.recv(100) == b"still ours"


def test_real_kernel_with_ktls_takes_the_keys() -> None:
    if not kernel_has_ktls():
        pytest.skip("this kernel has no tls ULP")
    with loopback_pair() as (client, _server):
        install_ktls(KernelSockopt(), client.fileno(), PARAMS)


def test_real_kernel_rejects_a_non_socket_fd_with_enotsock() -> None:
    read_end, write_end = os.pipe()
    try:
        fds = open_fds()
        with pytest.raises(KTLSInstallError) as info:
            install_ktls(KernelSockopt(), read_end, PARAMS)
        assert info.value.status == errno.ENOTSOCK
        assert open_fds() == fds
    finally:
        os.close(read_end)
        os.close(write_end)


def test_real_kernel_rejects_a_closed_fd_with_ebadf() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    os.close(write_end)
    with pytest.raises(KTLSInstallError) as info:
        install_ktls(KernelSockopt(), read_end, PARAMS)
    assert info.value.status == errno.EBADF


def test_real_kernel_sol_tls_before_the_ulp_is_enoprotoopt() -> None:
    # What the kernel says when TLS_TX comes without TCP_ULP (reference 3.5).
    with loopback_pair() as (client, _server):
        with pytest.raises(OSError) as info:
            KernelSockopt().setsockopt(client.fileno(), 282, 1, PARAMS.tx_crypto_info)
        assert info.value.errno == errno.ENOPROTOOPT


def test_real_kernel_batch_goes_through_one_dup_and_names_the_failed_step() -> None:
    if kernel_has_ktls():
        pytest.skip("this kernel has the tls ULP")
    with loopback_pair() as (client, _server):
        fds = open_fds()
        keepalive = (socket.SOL_SOCKET, socket.SO_KEEPALIVE, (1).to_bytes(4, sys.byteorder))
        with pytest.raises(BatchSockoptError) as info:
            KernelSockopt().setsockopts(client.fileno(), [keepalive, (SOL_TCP, TCP_ULP, b"tls"),
                                                          keepalive])
        assert (info.value.index, info.value.error.errno) == (1, errno.ENOENT)
        assert open_fds() == fds  # the dup was closed
        assert client.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1  # step 0 held
