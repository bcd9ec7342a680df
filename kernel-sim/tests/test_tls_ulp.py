"""kernel-sim's kTLS ULP: crypto_info rules, the record layer, and interop with real TLS stacks.

The interop tests run OpenSSL and GnuTLS in other processes. The test does the
handshake with pyOpenSSL over memory BIOs on the real TCP socket, one whole
record at a time, so not a byte past the peer's Finished is consumed; then it
derives the record keys from the key log (tls13_testkeys), installs them
through ULPRegistry and talks through KTLSSocket.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import os
import select
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest
import tls13_testkeys as tk
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st
from OpenSSL import SSL

from kernel_sim.tls_record import RecordCipher, new_record_cipher
from kernel_sim.tls_ulp import (
    ALERT,
    APPLICATION_DATA,
    HANDSHAKE,
    SOL_TCP,
    SOL_TLS,
    TCP_ULP,
    TLS_RX,
    TLS_RX_EXPECT_NO_PAD,
    TLS_TX,
    TLS_TX_ZEROCOPY_RO,
    CipherType,
    KTLSSocket,
    ULPRegistry,
    parse_crypto_info,
    tcp_state,
)

TIMEOUT = 10.0
TLS12, TLS13 = 0x0303, 0x0304
# iv, key, salt per cipher (include/uapi/linux/tls.h); rec_seq is always 8.
SIZES = {
    51: (8, 16, 4),
    52: (8, 32, 4),
    53: (8, 16, 4),
    54: (12, 32, 0),
    55: (8, 16, 4),
    56: (8, 16, 4),
    57: (8, 16, 4),
    58: (8, 32, 4),
}
STRUCT_SIZE = {51: 40, 52: 56, 53: 40, 54: 56, 55: 40, 56: 40, 57: 40, 58: 56}
KEY_UPDATE_NOT_REQUESTED = b"\x18\x00\x00\x01\x00"
KEY_UPDATE_REQUESTED = b"\x18\x00\x00\x01\x01"
NEW_SESSION_TICKET = 4


def errno_of(excinfo: pytest.ExceptionInfo[OSError]) -> int | None:
    return excinfo.value.errno


def info_bytes(cipher: int = 51, version: int = TLS13, seed: int = 1, rec_seq: int = 0) -> bytes:
    iv_len, key_len, salt_len = SIZES[cipher]

    def fill(size: int, salt: int) -> bytes:
        return bytes((seed * 31 + salt + i) % 256 for i in range(size))

    return tk.pack_crypto_info(
        version, cipher, fill(iv_len, 1), fill(key_len, 2), fill(salt_len, 3), rec_seq
    )


def sealer(info: bytes) -> RecordCipher:
    """The sending side's record state, to forge or tamper records by hand."""
    return new_record_cipher(parse_crypto_info(info))


def lookup(registry: ULPRegistry, sock: socket.socket) -> KTLSSocket:
    ktls = registry.lookup(sock)
    assert ktls is not None
    return ktls


def wait_queued(sock: socket.socket, size: int) -> None:
    """Wait until ``size`` bytes sit in ``sock``'s receive queue (for coalescing tests)."""
    deadline = time.monotonic() + TIMEOUT
    while len(sock.recv(size, socket.MSG_PEEK | socket.MSG_DONTWAIT)) < size:
        assert time.monotonic() < deadline, "bytes never arrived"
        time.sleep(0.01)


def recv_exact(sock: socket.socket, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(size - len(buf))
        if not chunk:
            raise ConnectionError("EOF")
        buf += chunk
    return bytes(buf)


def read_data(ktls: KTLSSocket, size: int) -> tuple[bytes, list[tuple[int, bytes]]]:
    """Application data up to ``size`` bytes, and the non-data records met on the way."""
    data, others = bytearray(), []
    while len(data) < size:
        rtype, chunk = ktls.recvmsg(65536)
        if rtype == APPLICATION_DATA:
            assert chunk, "unexpected EOF"
            data += chunk
        else:
            others.append((rtype, chunk))
    return bytes(data), others


def send_in_thread(ktls: KTLSSocket, data: bytes) -> threading.Thread:
    thread = threading.Thread(target=ktls.sendmsg, args=(data,), daemon=True)
    thread.start()
    return thread


# --- fixtures -------------------------------------------------------------------------


@pytest.fixture
def registry() -> ULPRegistry:
    return ULPRegistry()


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
        server, _ = listener.accept()
    server.settimeout(TIMEOUT)
    yield client, server
    client.close()
    server.close()


@dataclass
class Pair:
    a: KTLSSocket
    b: KTLSSocket
    a_to_b: bytes  # crypto_info of a's TX == b's RX
    b_to_a: bytes
    version: int
    cipher: int


def make_pair(
    registry: ULPRegistry,
    socks: tuple[socket.socket, socket.socket],
    version: int = TLS13,
    cipher: int = 51,
) -> Pair:
    a_to_b = info_bytes(cipher, version, seed=1, rec_seq=1 if version == TLS12 else 0)
    b_to_a = info_bytes(cipher, version, seed=2, rec_seq=1 if version == TLS12 else 0)
    for sock, tx, rx in ((socks[0], a_to_b, b_to_a), (socks[1], b_to_a, a_to_b)):
        registry.setsockopt(sock, SOL_TCP, TCP_ULP, b"tls\0")
        registry.setsockopt(sock, SOL_TLS, TLS_TX, tx)
        registry.setsockopt(sock, SOL_TLS, TLS_RX, rx)
    a, b = lookup(registry, socks[0]), lookup(registry, socks[1])
    return Pair(a, b, a_to_b, b_to_a, version, cipher)


ROUND_TRIP = {
    (TLS13, 51): "tls13-aes-gcm-128",
    (TLS13, 52): "tls13-aes-gcm-256",
    (TLS13, 53): "tls13-aes-ccm-128",
    (TLS13, 54): "tls13-chacha20-poly1305",
    (TLS13, 55): "tls13-sm4-gcm",
    (TLS12, 51): "tls12-aes-gcm-128",
    (TLS12, 53): "tls12-aes-ccm-128",
    (TLS12, 54): "tls12-chacha20-poly1305",
}
TLS13_ONLY = {key: name for key, name in ROUND_TRIP.items() if key[0] == TLS13}


def record_len(pair: Pair, plaintext_len: int) -> int:
    """Header + body of one record on the wire."""
    if pair.version == TLS13:
        return 5 + plaintext_len + 1 + 16
    return 5 + (0 if pair.cipher == 54 else 8) + plaintext_len + 16


@pytest.fixture(params=list(ROUND_TRIP), ids=ROUND_TRIP.get)
def pair(
    request: pytest.FixtureRequest,
    registry: ULPRegistry,
    tcp_pair: tuple[socket.socket, socket.socket],
) -> Pair:
    version, cipher = request.param
    return make_pair(registry, tcp_pair, version, cipher)


@pytest.fixture(params=list(TLS13_ONLY), ids=TLS13_ONLY.get)
def pair13(
    request: pytest.FixtureRequest,
    registry: ULPRegistry,
    tcp_pair: tuple[socket.socket, socket.socket],
) -> Pair:
    version, cipher = request.param
    return make_pair(registry, tcp_pair, version, cipher)


# === 1. crypto_info parsing and the setsockopt/getsockopt rules ======================


@pytest.mark.parametrize("cipher", sorted(SIZES))
def test_parse_accepts_exact_struct_size_of_every_cipher(cipher: int) -> None:
    version = TLS12 if cipher in (57, 58) else TLS13
    raw = info_bytes(cipher, version, rec_seq=7)

    info = parse_crypto_info(raw)

    assert len(raw) == STRUCT_SIZE[cipher]
    assert (info.version, info.cipher) == (version, CipherType(cipher))
    assert info.to_bytes() == raw
    assert int.from_bytes(info.rec_seq, "big") == 7


@pytest.mark.parametrize("cipher", sorted(SIZES))
@pytest.mark.parametrize("delta", [-1, +1])
def test_parse_rejects_one_byte_short_or_long(cipher: int, delta: int) -> None:
    version = TLS12 if cipher in (57, 58) else TLS13
    raw = info_bytes(cipher, version)
    bad = raw[:delta] if delta < 0 else raw + b"\0"

    with pytest.raises(OSError) as excinfo:
        parse_crypto_info(bad)

    assert errno_of(excinfo) == errno.EINVAL


@pytest.mark.parametrize("raw", [b"", b"\x04", b"\x04\x03\x33"], ids=["empty", "1", "3"])
def test_parse_rejects_optlen_below_the_header(raw: bytes) -> None:
    with pytest.raises(OSError) as excinfo:
        parse_crypto_info(raw)
    assert errno_of(excinfo) == errno.EINVAL


@pytest.mark.parametrize(
    ("version", "cipher"),
    [(0x0302, 51), (0x0305, 51), (TLS13, 50), (TLS13, 59), (TLS13, 57), (TLS13, 58)],
    ids=["tls11", "version-0x0305", "cipher-50", "cipher-59", "aria128-tls13", "aria256-tls13"],
)
def test_parse_rejects_unknown_version_unknown_cipher_and_aria_with_tls13(
    version: int, cipher: int
) -> None:
    raw = tk.pack_crypto_info(version, cipher, b"\0" * 8, b"\0" * 16, b"\0" * 4, 0)

    with pytest.raises(OSError) as excinfo:
        parse_crypto_info(raw)

    assert errno_of(excinfo) == errno.EINVAL


def test_crypto_info_repr_hides_key_iv_and_salt() -> None:
    info = parse_crypto_info(tk.pack_crypto_info(TLS13, 51, b"I" * 8, b"K" * 16, b"S" * 4, 0))

    text = repr(info)

    assert "KKKK" not in text and "IIII" not in text and "SSSS" not in text
    assert "AES_GCM_128" in text


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80))
def test_parse_of_arbitrary_bytes_returns_info_or_einval(raw: bytes) -> None:
    try:
        info = parse_crypto_info(raw)
    except OSError as exc:
        assert exc.errno == errno.EINVAL
    else:
        assert info.to_bytes() == raw


def test_testkeys_derivation_matches_rfc8448_simple_1rtt() -> None:
    # RFC 8448 section 3: server handshake and client application traffic secrets.
    suite = tk.SUITES["TLS_AES_128_GCM_SHA256"]
    server_hs = bytes.fromhex("b67b7d690cc16c4e75e54213cb2d37b4e9c912bcded9105d42befd59d391ad38")
    client_ap = bytes.fromhex("9e40646ce79a7f9dc05af8889bce6552875afa0b06df0087f792ebb7c17504a5")

    hs_key_iv = tk.traffic_key_iv(suite, server_hs)
    ap_key_iv = tk.traffic_key_iv(suite, client_ap)

    assert hs_key_iv == (
        bytes.fromhex("3fce516009c21727d0f2e4e86ee403bc"),
        bytes.fromhex("5d313eb2671276ee13000b30"),
    )
    assert ap_key_iv == (
        bytes.fromhex("17422dda596ed5d9acd890e3c63f5051"),
        bytes.fromhex("5b78923dee08579033e523d9"),
    )


def test_sol_tls_before_the_ulp_is_enoprotoopt(
    registry: ULPRegistry, tcp_pair: tuple[socket.socket, socket.socket]
) -> None:
    sock = tcp_pair[0]

    with pytest.raises(OSError) as set_exc:
        registry.setsockopt(sock, SOL_TLS, TLS_TX, info_bytes())
    with pytest.raises(OSError) as get_exc:
        registry.getsockopt(sock, SOL_TLS, TLS_TX, 40)

    assert errno_of(set_exc) == errno_of(get_exc) == errno.ENOPROTOOPT


@pytest.mark.parametrize("name", [b"tls\0", b"tls", b"tls\0junk"])
def test_ulp_name_tls_is_accepted_with_or_without_nul(
    registry: ULPRegistry, tcp_pair: tuple[socket.socket, socket.socket], name: bytes
) -> None:
    registry.setsockopt(tcp_pair[0], SOL_TCP, TCP_ULP, name)

    assert registry.lookup(tcp_pair[0]) is not None
    assert registry.getsockopt(tcp_pair[0], SOL_TCP, TCP_ULP, 16).rstrip(b"\0") == b"tls"


@pytest.mark.parametrize(
    ("name", "code"), [(b"tlx", errno.ENOENT), (b"tls1", errno.ENOENT), (b"", errno.EINVAL)]
)
def test_unknown_ulp_name_is_enoent(
    registry: ULPRegistry, tcp_pair: tuple[socket.socket, socket.socket], name: bytes, code: int
) -> None:
    with pytest.raises(OSError) as excinfo:
        registry.setsockopt(tcp_pair[0], SOL_TCP, TCP_ULP, name)

    assert errno_of(excinfo) == code
    assert registry.lookup(tcp_pair[0]) is None
    assert registry.getsockopt(tcp_pair[0], SOL_TCP, TCP_ULP, 16) == b""


def test_second_ulp_is_eexist_even_through_a_dup(
    registry: ULPRegistry, tcp_pair: tuple[socket.socket, socket.socket]
) -> None:
    registry.set_ulp(tcp_pair[0], b"tls\0")

    with tcp_pair[0].dup() as dup, pytest.raises(OSError) as excinfo:
        registry.set_ulp(dup, b"tls\0")

    assert errno_of(excinfo) == errno.EEXIST


def test_ulp_on_unconnected_or_listening_socket_is_enotconn(registry: ULPRegistry) -> None:
    with socket.socket() as fresh, socket.create_server(("127.0.0.1", 0)) as listener:
        for sock in (fresh, listener):
            with pytest.raises(OSError) as excinfo:
                registry.set_ulp(sock, b"tls\0")
            assert errno_of(excinfo) == errno.ENOTCONN


def test_ulp_after_the_peer_closed_is_enotconn(
    registry: ULPRegistry, tcp_pair: tuple[socket.socket, socket.socket]
) -> None:
    tcp_pair[1].close()
    deadline = time.monotonic() + TIMEOUT
    while tcp_state(tcp_pair[0]) == 1:  # ESTABLISHED until the FIN lands (CLOSE_WAIT)
        assert time.monotonic() < deadline
        time.sleep(0.01)

    with pytest.raises(OSError) as excinfo:
        registry.set_ulp(tcp_pair[0], b"tls\0")

    assert errno_of(excinfo) == errno.ENOTCONN


def test_ulp_on_udp_socket_is_enoprotoopt(registry: ULPRegistry) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, pytest.raises(OSError) as exc:
        registry.set_ulp(udp, b"tls\0")
    assert errno_of(exc) == errno.ENOPROTOOPT


@pytest.fixture
def ulp_sock(registry: ULPRegistry, tcp_pair: tuple[socket.socket, socket.socket]) -> socket.socket:
    registry.set_ulp(tcp_pair[0], b"tls\0")
    return tcp_pair[0]


@pytest.mark.parametrize(
    ("tx", "rx"),
    [((TLS13, 51), (TLS13, 52)), ((TLS13, 51), (TLS12, 51)), ((TLS12, 54), (TLS13, 54))],
    ids=["cipher", "version-13-then-12", "version-12-then-13"],
)
def test_rx_must_match_tx_version_and_cipher(
    registry: ULPRegistry, ulp_sock: socket.socket, tx: tuple[int, int], rx: tuple[int, int]
) -> None:
    registry.setsockopt(ulp_sock, SOL_TLS, TLS_TX, info_bytes(tx[1], tx[0]))

    with pytest.raises(OSError) as excinfo:
        registry.setsockopt(ulp_sock, SOL_TLS, TLS_RX, info_bytes(rx[1], rx[0]))

    assert errno_of(excinfo) == errno.EINVAL
    with pytest.raises(OSError) as get_exc:
        registry.getsockopt(ulp_sock, SOL_TLS, TLS_RX, 40)
    assert errno_of(get_exc) == errno.EBUSY  # the direction stayed unconfigured


def test_failed_setsockopt_leaves_direction_unconfigured(
    registry: ULPRegistry, ulp_sock: socket.socket
) -> None:
    with pytest.raises(OSError):
        registry.setsockopt(ulp_sock, SOL_TLS, TLS_TX, info_bytes()[:-1])

    registry.setsockopt(ulp_sock, SOL_TLS, TLS_TX, info_bytes())  # a first TX, not a rekey

    assert registry.stats()["TlsTxSw"] == 1
    assert registry.stats()["TlsTxRekeyOk"] == 0


@pytest.mark.parametrize("cipher", [56, 57, 58], ids=["sm4-ccm", "aria-128", "aria-256"])
def test_cipher_without_an_aead_here_is_enoent_like_a_missing_crypto_module(
    registry: ULPRegistry, ulp_sock: socket.socket, cipher: int
) -> None:
    with pytest.raises(OSError) as excinfo:
        registry.setsockopt(ulp_sock, SOL_TLS, TLS_TX, info_bytes(cipher, TLS12))

    assert errno_of(excinfo) == errno.ENOENT
    assert registry.stats()["TlsCurrTxSw"] == 0


@pytest.mark.parametrize("optname", [TLS_TX, TLS_RX], ids=["tx", "rx"])
def test_tls12_second_setting_is_ebusy(
    registry: ULPRegistry, ulp_sock: socket.socket, optname: int
) -> None:
    registry.setsockopt(ulp_sock, SOL_TLS, optname, info_bytes(51, TLS12))

    with pytest.raises(OSError) as excinfo:
        registry.setsockopt(ulp_sock, SOL_TLS, optname, info_bytes(51, TLS12, seed=9))

    assert errno_of(excinfo) == errno.EBUSY
    side = "Tx" if optname == TLS_TX else "Rx"
    assert registry.stats()[f"Tls{side}RekeyError"] == 1


@pytest.mark.parametrize("optname", [TLS_TX, TLS_RX], ids=["tx", "rx"])
def test_tls13_second_setting_is_a_rekey_with_same_version_and_cipher(
    registry: ULPRegistry, ulp_sock: socket.socket, optname: int
) -> None:
    registry.setsockopt(ulp_sock, SOL_TLS, optname, info_bytes(52, seed=1))

    registry.setsockopt(ulp_sock, SOL_TLS, optname, info_bytes(52, seed=2, rec_seq=5))

    side = "Tx" if optname == TLS_TX else "Rx"
    stats = registry.stats()
    assert (stats[f"Tls{side}Sw"], stats[f"TlsCurr{side}Sw"], stats[f"Tls{side}RekeyOk"]) == (
        1,
        1,
        1,
    )
    assert registry.getsockopt(ulp_sock, SOL_TLS, optname, 56) == info_bytes(52, seed=2, rec_seq=5)


@pytest.mark.parametrize(
    ("version", "cipher"), [(TLS13, 51), (TLS12, 52)], ids=["other-cipher", "tls12"]
)
def test_tls13_rekey_changing_version_or_cipher_is_einval_and_keeps_old_key(
    registry: ULPRegistry, ulp_sock: socket.socket, version: int, cipher: int
) -> None:
    old = info_bytes(52)
    registry.setsockopt(ulp_sock, SOL_TLS, TLS_RX, old)

    with pytest.raises(OSError) as excinfo:
        registry.setsockopt(ulp_sock, SOL_TLS, TLS_RX, info_bytes(cipher, version))

    assert errno_of(excinfo) == errno.EINVAL
    assert registry.getsockopt(ulp_sock, SOL_TLS, TLS_RX, 56) == old
    assert registry.stats()["TlsRxRekeyError"] == 1


def test_getsockopt_conf_rules(registry: ULPRegistry, ulp_sock: socket.socket) -> None:
    raw = info_bytes(54)
    registry.setsockopt(ulp_sock, SOL_TLS, TLS_TX, raw)

    header = registry.getsockopt(ulp_sock, SOL_TLS, TLS_TX, 4)
    whole = registry.getsockopt(ulp_sock, SOL_TLS, TLS_TX, 56)

    assert (header, whole) == (raw[:4], raw)  # the kernel returns the key as well
    for optlen, code in ((3, errno.EINVAL), (40, errno.EINVAL), (57, errno.EINVAL)):
        with pytest.raises(OSError) as excinfo:
            registry.getsockopt(ulp_sock, SOL_TLS, TLS_TX, optlen)
        assert errno_of(excinfo) == code
    with pytest.raises(OSError) as busy:
        registry.getsockopt(ulp_sock, SOL_TLS, TLS_RX, 56)
    assert errno_of(busy) == errno.EBUSY


def test_unknown_sol_tls_option_is_enoprotoopt(
    registry: ULPRegistry, ulp_sock: socket.socket
) -> None:
    for call in (
        lambda: registry.setsockopt(ulp_sock, SOL_TLS, 99, b"\0" * 4),
        lambda: registry.getsockopt(ulp_sock, SOL_TLS, 99, 4),
    ):
        with pytest.raises(OSError) as excinfo:
            call()
        assert errno_of(excinfo) == errno.ENOPROTOOPT


def test_rx_expect_no_pad_needs_tls13_and_rx(
    registry: ULPRegistry, ulp_sock: socket.socket
) -> None:
    one = (1).to_bytes(4, "little")
    registry.setsockopt(ulp_sock, SOL_TLS, TLS_TX, info_bytes(51))
    with pytest.raises(OSError) as before_rx:
        registry.setsockopt(ulp_sock, SOL_TLS, TLS_RX_EXPECT_NO_PAD, one)

    registry.setsockopt(ulp_sock, SOL_TLS, TLS_RX, info_bytes(51, seed=2))
    registry.setsockopt(ulp_sock, SOL_TLS, TLS_RX_EXPECT_NO_PAD, one + b"\0\0")

    assert errno_of(before_rx) == errno.EINVAL
    assert registry.getsockopt(ulp_sock, SOL_TLS, TLS_RX_EXPECT_NO_PAD, 4) == one
    for bad in ((2).to_bytes(4, "little"), b"\1\0\0", one + b"\1"):
        with pytest.raises(OSError) as excinfo:
            registry.setsockopt(ulp_sock, SOL_TLS, TLS_RX_EXPECT_NO_PAD, bad)
        assert errno_of(excinfo) == errno.EINVAL


def test_rx_expect_no_pad_with_tls12_is_einval(
    registry: ULPRegistry, ulp_sock: socket.socket
) -> None:
    registry.setsockopt(ulp_sock, SOL_TLS, TLS_RX, info_bytes(51, TLS12))

    with pytest.raises(OSError) as excinfo:
        registry.setsockopt(ulp_sock, SOL_TLS, TLS_RX_EXPECT_NO_PAD, b"\1\0\0\0")

    assert errno_of(excinfo) == errno.EINVAL


def test_tx_zerocopy_ro_is_a_u32_flag(registry: ULPRegistry, ulp_sock: socket.socket) -> None:
    registry.setsockopt(ulp_sock, SOL_TLS, TLS_TX_ZEROCOPY_RO, b"\1\0\0\0")

    assert registry.getsockopt(ulp_sock, SOL_TLS, TLS_TX_ZEROCOPY_RO, 4) == b"\1\0\0\0"
    with pytest.raises(OSError) as excinfo:
        registry.setsockopt(ulp_sock, SOL_TLS, TLS_TX_ZEROCOPY_RO, b"\1\0\0\0\0")
    assert errno_of(excinfo) == errno.EINVAL


def test_other_levels_pass_through_to_tcp(registry: ULPRegistry, ulp_sock: socket.socket) -> None:
    registry.setsockopt(ulp_sock, socket.IPPROTO_TCP, socket.TCP_NODELAY, (1).to_bytes(4, "little"))

    assert ulp_sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


def test_stats_count_sockets_and_close_releases_them_once(
    registry: ULPRegistry, tcp_pair: tuple[socket.socket, socket.socket]
) -> None:
    p = make_pair(registry, tcp_pair)

    p.a.close()
    registry.forget(tcp_pair[1])
    registry.forget(tcp_pair[1])

    stats = registry.stats()
    assert (stats["TlsTxSw"], stats["TlsRxSw"]) == (2, 2)
    assert (stats["TlsCurrTxSw"], stats["TlsCurrRxSw"]) == (0, 0)
    assert registry.lookup(tcp_pair[1]) is None
    assert registry.format_tls_stat().startswith("TlsCurrTxSw                     \t0\n")


# === 2. the record layer, ULP to ULP ==================================================


def test_data_flows_both_ways(pair: Pair) -> None:
    pair.a.sendmsg(b"ping")
    assert pair.b.recvmsg(100) == (APPLICATION_DATA, b"ping")

    pair.b.sendmsg(b"pong")
    assert pair.a.recvmsg(100) == (APPLICATION_DATA, b"pong")


def test_large_payload_is_split_into_16k_records(pair: Pair) -> None:
    payload = os.urandom(100 * 1024)
    seq0 = pair.a.tx_record_seq or 0

    sender = send_in_thread(pair.a, payload)
    data, others = read_data(pair.b, len(payload))
    sender.join(TIMEOUT)

    assert data == payload and others == []
    assert (pair.a.tx_record_seq or 0) - seq0 == 7  # ceil(102400 / 16384)
    assert pair.b.rx_record_seq == pair.a.tx_record_seq


def test_non_data_records_come_alone_and_eio_without_cmsg(pair: Pair) -> None:
    pair.a.sendmsg(b"one")
    pair.a.sendmsg(b"\x01\x00", ALERT)  # warning close_notify: the kernel does not act on it
    pair.a.sendmsg(b"two")

    first = pair.b.recvmsg(100)
    with pytest.raises(OSError) as excinfo:
        pair.b.recvmsg(100, want_record_type=False)
    with pytest.raises(OSError) as again:
        pair.b.recvmsg(100, want_record_type=False)  # still queued, still EIO

    assert first == (APPLICATION_DATA, b"one")
    assert errno_of(excinfo) == errno_of(again) == errno.EIO
    assert pair.b.recvmsg(100) == (ALERT, b"\x01\x00")
    assert pair.b.recvmsg(100, want_record_type=False) == (APPLICATION_DATA, b"two")


def test_read_sock_rejects_non_data_record_and_leaves_it_queued(pair: Pair) -> None:
    pair.a.sendmsg(b"\x04\x00\x00\x00", HANDSHAKE)
    pair.a.sendmsg(b"data")

    with pytest.raises(OSError) as excinfo:
        pair.b.read_sock()

    assert errno_of(excinfo) == errno.EINVAL
    assert pair.b.recvmsg(100) == (HANDSHAKE, b"\x04\x00\x00\x00")
    assert pair.b.read_sock() == b"data"


def test_ready_data_records_coalesce_up_to_bufsize(pair: Pair) -> None:
    pair.a.sendmsg(b"ab")
    pair.a.sendmsg(b"cd")
    pair.a.sendmsg(b"ef")
    wait_queued(pair.b.sock, 3 * record_len(pair, 2))

    assert pair.b.recvmsg(5) == (APPLICATION_DATA, b"abcde")
    assert pair.b.recvmsg(100) == (APPLICATION_DATA, b"f")


def test_bytes_after_a_record_stay_in_the_socket(pair: Pair) -> None:
    pair.a.sendmsg(b"record")
    pair.a.sock.sendall(b"TRAILER")

    assert pair.b.recvmsg(100) == (APPLICATION_DATA, b"record")
    assert recv_exact(pair.b.sock, 7) == b"TRAILER"


def test_tampered_record_is_ebadmsg_sticky_and_fails_send(
    pair: Pair, registry: ULPRegistry
) -> None:
    record = bytearray(sealer(pair.a_to_b).seal(APPLICATION_DATA, b"secret"))
    record[-1] ^= 0x01
    pair.a.sock.sendall(record)

    errors = []
    for call in (lambda: pair.b.recvmsg(100), pair.b.read_sock, lambda: pair.b.sendmsg(b"x")):
        with pytest.raises(OSError) as excinfo:
            call()
        errors.append(errno_of(excinfo))

    assert errors == [errno.EBADMSG] * 3
    assert registry.stats()["TlsDecryptError"] == 2  # each read decrypts the record again


@pytest.mark.parametrize(
    ("header", "code"),
    [
        (b"\x17\x03\x03" + (2**14 + 257).to_bytes(2, "big"), errno.EMSGSIZE),  # RFC 8446 limit
        (b"\x17\x03\x03" + (2**14 + 16 + 1 + 1).to_bytes(2, "big"), errno.EMSGSIZE),  # kernel's
        (b"\x17\x03\x03\x00\x0f", errno.EBADMSG),  # shorter than the tag
        (b"\x17\x03\x01\x00\x20", errno.EINVAL),  # "both TLS1.3 and TLS1.2 use TLS_1_2 version"
    ],
    ids=["rfc-limit", "kernel-limit", "short", "version"],
)
def test_bad_tls13_record_header_fails_and_stays_failed(
    pair13: Pair, header: bytes, code: int
) -> None:
    pair13.a.sock.sendall(header)

    for _ in range(2):
        with pytest.raises(OSError) as excinfo:
            pair13.b.recvmsg(100)
        assert errno_of(excinfo) == code


def test_tls13_largest_legal_record_length_passes_the_size_check(pair13: Pair) -> None:
    pair13.a.sock.sendall(b"\x17\x03\x03" + (2**14 + 17).to_bytes(2, "big") + b"\0" * (2**14 + 17))

    with pytest.raises(OSError) as excinfo:
        pair13.b.recvmsg(100)

    assert errno_of(excinfo) == errno.EBADMSG  # it got as far as decryption


def test_tls13_padding_is_stripped_and_counted_with_no_pad(
    pair13: Pair, registry: ULPRegistry
) -> None:
    registry.setsockopt(pair13.b.sock, SOL_TLS, TLS_RX_EXPECT_NO_PAD, b"\1\0\0\0")
    # seal() appends the type byte: type 0 after "hi" 0x17 0 0 makes a padded data record.
    pair13.a.sock.sendall(sealer(pair13.a_to_b).seal(0, b"hi\x17\x00\x00"))

    assert pair13.b.recvmsg(100) == (APPLICATION_DATA, b"hi")
    assert registry.stats()["TlsRxNoPadViolation"] == 1


def test_tls13_all_zero_inner_plaintext_is_ebadmsg(pair13: Pair) -> None:
    pair13.a.sock.sendall(sealer(pair13.a_to_b).seal(0, b"\x00\x00\x00"))

    with pytest.raises(OSError) as excinfo:
        pair13.b.recvmsg(100)

    assert errno_of(excinfo) == errno.EBADMSG


def test_tls13_outer_type_is_ignored_the_aad_always_says_23(pair13: Pair) -> None:
    record = bytearray(sealer(pair13.a_to_b).seal(APPLICATION_DATA, b"x"))
    record[0] = HANDSHAKE  # tls_make_aad() puts 23 in the AAD whatever the header says

    pair13.a.sock.sendall(record)

    assert pair13.b.recvmsg(100) == (APPLICATION_DATA, b"x")


def test_zero_length_data_record_is_not_eof(pair: Pair) -> None:
    forged = sealer(pair.a_to_b)
    pair.a.sock.sendall(forged.seal(APPLICATION_DATA, b"") + forged.seal(APPLICATION_DATA, b"x"))

    assert pair.b.recvmsg(100) == (APPLICATION_DATA, b"x")


def test_key_update_pauses_rx_until_rekey(pair13: Pair, registry: ULPRegistry) -> None:
    a_next = info_bytes(pair13.cipher, seed=7)
    pair13.a.sendmsg(KEY_UPDATE_NOT_REQUESTED, HANDSHAKE)
    registry.setsockopt(pair13.a.sock, SOL_TLS, TLS_TX, a_next)
    pair13.a.sendmsg(b"under the new key")

    ku = pair13.b.recvmsg(100)
    paused = []
    for call in (lambda: pair13.b.recvmsg(100), pair13.b.read_sock):
        with pytest.raises(OSError) as excinfo:
            call()
        paused.append(errno_of(excinfo))
    pair13.b.sendmsg(b"tx is not paused")
    registry.setsockopt(pair13.b.sock, SOL_TLS, TLS_RX, a_next)

    assert ku == (HANDSHAKE, KEY_UPDATE_NOT_REQUESTED)
    assert paused == [errno.EKEYEXPIRED] * 2
    assert pair13.a.recvmsg(100) == (APPLICATION_DATA, b"tx is not paused")
    assert pair13.b.recvmsg(100) == (APPLICATION_DATA, b"under the new key")
    assert pair13.b.rx_record_seq == 1
    stats = registry.stats()
    assert (stats["TlsRxRekeyReceived"], stats["TlsRxRekeyOk"], stats["TlsTxRekeyOk"]) == (1, 1, 1)


def test_key_update_read_without_cmsg_is_eio_then_delivered(pair13: Pair) -> None:
    pair13.a.sendmsg(KEY_UPDATE_REQUESTED, HANDSHAKE)

    with pytest.raises(OSError) as excinfo:
        pair13.b.recvmsg(100, want_record_type=False)

    assert errno_of(excinfo) == errno.EIO
    assert pair13.b.recvmsg(100) == (HANDSHAKE, KEY_UPDATE_REQUESTED)
    with pytest.raises(OSError) as paused:
        pair13.b.recvmsg(100)
    assert errno_of(paused) == errno.EKEYEXPIRED


def test_data_before_a_key_update_is_still_delivered(pair13: Pair) -> None:
    pair13.a.sendmsg(b"before")
    pair13.a.sendmsg(KEY_UPDATE_NOT_REQUESTED, HANDSHAKE)
    wait_queued(pair13.b.sock, record_len(pair13, 6) + record_len(pair13, 5))

    assert pair13.b.recvmsg(100) == (APPLICATION_DATA, b"before")
    assert pair13.b.recvmsg(100) == (HANDSHAKE, KEY_UPDATE_NOT_REQUESTED)


def test_eof_reads_as_empty_data(pair: Pair) -> None:
    pair.a.close()

    assert pair.b.recvmsg(100) == (APPLICATION_DATA, b"")
    assert pair.b.recvmsg(100) == (APPLICATION_DATA, b"")


def test_partial_record_survives_a_timeout(pair: Pair) -> None:
    record = sealer(pair.a_to_b).seal(APPLICATION_DATA, b"slow")
    pair.b.sock.settimeout(0.2)
    pair.a.sock.sendall(record[:3])

    with pytest.raises(TimeoutError):
        pair.b.recvmsg(100)
    pair.a.sock.sendall(record[3:])
    pair.b.sock.settimeout(TIMEOUT)

    assert pair.b.recvmsg(100) == (APPLICATION_DATA, b"slow")


def test_without_tx_and_rx_config_the_ulp_passes_plaintext(
    registry: ULPRegistry, tcp_pair: tuple[socket.socket, socket.socket]
) -> None:
    registry.set_ulp(tcp_pair[0], b"tls\0")
    registry.set_ulp(tcp_pair[1], b"tls\0")
    a, b = lookup(registry, tcp_pair[0]), lookup(registry, tcp_pair[1])

    a.sendmsg(b"plain", HANDSHAKE)

    assert recv_exact(tcp_pair[1], 5) == b"plain"
    tcp_pair[0].sendall(b"raw")
    assert b.recvmsg(100) == (APPLICATION_DATA, b"raw")


def test_getsockopt_reports_live_rec_seq_and_tls12_explicit_iv(
    registry: ULPRegistry, tcp_pair: tuple[socket.socket, socket.socket]
) -> None:
    p = make_pair(registry, tcp_pair, TLS12, 51)
    for _ in range(3):
        p.a.sendmsg(b"x")

    info = parse_crypto_info(registry.getsockopt(tcp_pair[0], SOL_TLS, TLS_TX, 40))

    start = parse_crypto_info(p.a_to_b)
    assert int.from_bytes(info.rec_seq, "big") == 1 + 3
    assert int.from_bytes(info.iv, "big") == int.from_bytes(start.iv, "big") + 3
    assert (info.key, info.salt) == (start.key, start.salt)


def test_rekey_from_another_thread_does_not_wait_for_a_blocked_reader(
    pair13: Pair, registry: ULPRegistry
) -> None:
    got: list[tuple[int, bytes]] = []
    reader = threading.Thread(target=lambda: got.append(pair13.b.recvmsg(100)), daemon=True)
    reader.start()
    time.sleep(0.1)

    started = time.monotonic()
    registry.setsockopt(pair13.b.sock, SOL_TLS, TLS_TX, info_bytes(pair13.cipher, seed=5))
    elapsed = time.monotonic() - started
    pair13.a.sendmsg(b"wake")
    reader.join(TIMEOUT)

    assert elapsed < 1.0
    assert got == [(APPLICATION_DATA, b"wake")]


# --- the wire format, checked with an independent decoder ----------------------------


def _raw_record(sock: socket.socket) -> tuple[bytes, bytes]:
    header = recv_exact(sock, 5)
    return header, recv_exact(sock, int.from_bytes(header[3:5], "big"))


def test_tls13_record_on_the_wire_follows_rfc8446(
    registry: ULPRegistry, tcp_pair: tuple[socket.socket, socket.socket]
) -> None:
    raw = info_bytes(54, seed=3)
    registry.set_ulp(tcp_pair[0], b"tls\0")
    registry.setsockopt(tcp_pair[0], SOL_TLS, TLS_TX, raw)
    info = parse_crypto_info(raw)

    lookup(registry, tcp_pair[0]).sendmsg(b"first")
    lookup(registry, tcp_pair[0]).sendmsg(b"\x02\x28", ALERT)

    aead = ChaCha20Poly1305(info.key)
    for seq, inner in ((0, b"first\x17"), (1, b"\x02\x28\x15")):
        header, body = _raw_record(tcp_pair[1])
        nonce = (int.from_bytes(info.iv, "big") ^ seq).to_bytes(12, "big")
        assert header == b"\x17\x03\x03" + len(body).to_bytes(2, "big")
        assert aead.decrypt(nonce, body, header) == inner


def test_tls12_gcm_record_carries_explicit_nonce_and_seq_aad(
    registry: ULPRegistry, tcp_pair: tuple[socket.socket, socket.socket]
) -> None:
    raw = info_bytes(51, TLS12, seed=4, rec_seq=1)
    registry.set_ulp(tcp_pair[0], b"tls\0")
    registry.setsockopt(tcp_pair[0], SOL_TLS, TLS_TX, raw)
    info = parse_crypto_info(raw)

    for _ in range(2):
        lookup(registry, tcp_pair[0]).sendmsg(b"hello", HANDSHAKE)

    for n in range(2):
        header, body = _raw_record(tcp_pair[1])
        explicit = (int.from_bytes(info.iv, "big") + n).to_bytes(8, "big")
        aad = (1 + n).to_bytes(8, "big") + b"\x16\x03\x03\x00\x05"
        assert header[:3] == b"\x16\x03\x03" and body[:8] == explicit
        assert AESGCM(info.key).decrypt(info.salt + explicit, body[8:], aad) == b"hello"


# --- property: seal/open are inverses, and any bit flip is caught ---------------------


@settings(max_examples=60, deadline=None)
@given(
    cipher=st.sampled_from([(TLS13, 51), (TLS13, 53), (TLS13, 54), (TLS12, 52), (TLS12, 54)]),
    rtype=st.sampled_from([ALERT, HANDSHAKE, APPLICATION_DATA]),
    plaintext=st.binary(max_size=300),
    flip=st.integers(min_value=0),
)
def test_seal_then_open_round_trips_and_detects_any_flip(
    cipher: tuple[int, int], rtype: int, plaintext: bytes, flip: int
) -> None:
    raw = info_bytes(cipher[1], cipher[0], seed=6)
    record = sealer(raw).seal(rtype, plaintext)
    header, body = record[:5], record[5:]

    assert sealer(raw).open(header, body)[:2] == (rtype, plaintext)
    spot = flip % len(body)
    tampered = body[:spot] + bytes([body[spot] ^ 0x80]) + body[spot + 1 :]
    with pytest.raises(OSError) as excinfo:
        sealer(raw).open(header, tampered)
    assert errno_of(excinfo) == errno.EBADMSG


# === 3. interop with OpenSSL and GnuTLS in other processes ============================

OPENSSL = shutil.which("openssl")
GNUTLS_SERV = shutil.which("gnutls-serv")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl CLI not installed")
needs_gnutls = pytest.mark.skipif(GNUTLS_SERV is None, reason="gnutls-serv not installed")
SUITE_NAMES = list(tk.SUITES)


@pytest.fixture(scope="session")
def cert_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kernel-sim.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("certs")
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _listening(port: int) -> bool:
    """Is some socket LISTENing on ``port``? (/proc/net/tcp*, state 0A; no probe connection)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as fh:
            for line in fh.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    return True
    return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


Spawner = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawner]:
    """Start a process (all killed at teardown); with ``port`` wait until it listens there."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(
        argv: list[str],
        *,
        port: int | None = None,
        stdin: int = subprocess.DEVNULL,
        stdout: int | None = None,
    ) -> subprocess.Popen[bytes]:
        log = open(tmp_path / f"proc{len(procs)}.log", "wb")  # noqa: SIM115
        out = log if stdout is None else stdout
        proc = subprocess.Popen(argv, stdin=stdin, stdout=out, stderr=log)
        log.close()
        procs.append(proc)
        deadline = time.monotonic() + TIMEOUT
        while port is not None and not _listening(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{argv[0]} did not listen on {port}")
            time.sleep(0.02)
        return proc

    yield start
    for proc in procs:
        _kill(proc)


def start_server(spawn: Spawner, argv_for: Callable[[int], list[str]]) -> int:
    """Spawn a server on a free port, retrying if the port was taken meanwhile."""
    for _attempt in range(3):
        port = _free_port()
        with contextlib.suppress(RuntimeError):
            spawn(argv_for(port), port=port)
            return port
    raise RuntimeError("server did not start")


def set_tls13_ciphersuites(ctx: SSL.Context, suites: bytes) -> None:
    """pyOpenSSL's method where it has one (>= 25.1), else the binding's call."""
    if hasattr(ctx, "set_tls13_ciphersuites"):
        ctx.set_tls13_ciphersuites(suites)
        return
    from OpenSSL._util import lib

    assert lib.SSL_CTX_set_ciphersuites(ctx._context, suites) == 1


def tls13_context(
    suite: tk.Suite, secrets: dict[str, bytes], cert_files: tuple[Path, Path] | None = None
) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
    set_tls13_ciphersuites(ctx, suite.name.encode())

    def keylog(_conn: SSL.Connection, line: bytes) -> None:
        label, secret = tk.parse_keylog_line(line)
        secrets[label] = secret

    ctx.set_keylog_callback(keylog)
    if cert_files is not None:
        ctx.use_certificate_file(str(cert_files[0]))
        ctx.use_privatekey_file(str(cert_files[1]))
    return ctx


def _flush(conn: SSL.Connection, sock: socket.socket) -> bytes:
    out = bytearray()
    while True:
        try:
            out += conn.bio_read(65536)
        except SSL.WantReadError:
            break
    sock.sendall(out)
    return bytes(out)


def handshake(conn: SSL.Connection, sock: socket.socket) -> bytes:
    """Drive ``conn`` over ``sock`` one whole record at a time; return the last flight sent."""
    while True:
        try:
            conn.do_handshake()
        except SSL.WantReadError:
            _flush(conn, sock)
            header = recv_exact(sock, 5)
            conn.bio_write(header + recv_exact(sock, int.from_bytes(header[3:5], "big")))
            continue
        return _flush(conn, sock)


def count_records(stream: bytes) -> int:
    count = 0
    while stream:
        stream = stream[5 + int.from_bytes(stream[3:5], "big") :]
        count += 1
    return count


def install(
    registry: ULPRegistry,
    sock: socket.socket,
    suite: tk.Suite,
    *,
    tx: bytes,
    rx: bytes,
    tx_seq: int = 0,
) -> KTLSSocket:
    """What the agent does after its handshake (tlshd passes "tls\\0")."""
    registry.setsockopt(sock, SOL_TCP, TCP_ULP, b"tls\0")
    registry.setsockopt(sock, SOL_TLS, TLS_TX, tk.crypto_info_tls13(suite, tx, tx_seq))
    registry.setsockopt(sock, SOL_TLS, TLS_RX, tk.crypto_info_tls13(suite, rx))
    return lookup(registry, sock)


@dataclass
class Client:
    ktls: KTLSSocket
    suite: tk.Suite
    secrets: dict[str, bytes]


@pytest.fixture
def connect(registry: ULPRegistry) -> Iterator[Callable[[int, str], Client]]:
    clients: list[KTLSSocket] = []

    def run(port: int, suite_name: str) -> Client:
        suite, secrets = tk.SUITES[suite_name], {}
        sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        conn = SSL.Connection(tls13_context(suite, secrets), None)
        conn.set_connect_state()
        handshake(conn, sock)
        ktls = install(
            registry,
            sock,
            suite,
            tx=secrets["CLIENT_TRAFFIC_SECRET_0"],
            rx=secrets["SERVER_TRAFFIC_SECRET_0"],
        )
        clients.append(ktls)
        return Client(ktls, suite, secrets)

    yield run
    for ktls in clients:
        ktls.close()


def s_server_argv(
    cert_files: tuple[Path, Path], suite: str, extra: list[str]
) -> Callable[[int], list[str]]:
    def argv(port: int) -> list[str]:
        assert OPENSSL is not None
        return [
            OPENSSL,
            "s_server",
            "-tls1_3",
            "-ciphersuites",
            suite,
            "-rev",
            "-accept",
            f"127.0.0.1:{port}",
            "-cert",
            str(cert_files[0]),
            "-key",
            str(cert_files[1]),
            *extra,
        ]

    return argv


def reversed_lines(lines: list[bytes]) -> bytes:
    return b"".join(line[::-1] + b"\n" for line in lines)


def handshake_messages(records: list[tuple[int, bytes]]) -> list[int]:
    """Handshake message types in a list of (type 22) records."""
    types = []
    for rtype, record in records:
        assert rtype == HANDSHAKE
        rest = record
        while rest:
            types.append(rest[0])
            rest = rest[4 + int.from_bytes(rest[1:4], "big") :]
    return types


@needs_openssl
@pytest.mark.parametrize("tickets", [0, None], ids=["no-tickets", "default-tickets"])
@pytest.mark.parametrize("suite", SUITE_NAMES)
def test_openssl_server_exchanges_data_with_the_model(
    spawn: Spawner,
    connect: Callable[[int, str], Client],
    cert_files: tuple[Path, Path],
    suite: str,
    tickets: int | None,
) -> None:
    extra = [] if tickets is None else ["-num_tickets", str(tickets)]
    port = start_server(spawn, s_server_argv(cert_files, suite, extra))
    client = connect(port, suite)
    lines = [b"hello kernel-sim"] + [os.urandom(600).hex().encode() for _ in range(86)]
    payload = b"".join(line + b"\n" for line in lines)  # > 100 KiB

    sender = send_in_thread(client.ktls, payload)
    data, others = read_data(client.ktls, len(payload))
    sender.join(TIMEOUT)

    assert len(payload) > 100 * 1024
    assert data == reversed_lines(lines)
    expected_tickets = 0 if tickets == 0 else 2
    assert len(others) == expected_tickets  # one handshake record per recvmsg
    assert handshake_messages(others) == [NEW_SESSION_TICKET] * expected_tickets


@needs_openssl
def test_openssl_session_tickets_are_einval_for_read_sock(
    spawn: Spawner, connect: Callable[[int, str], Client], cert_files: tuple[Path, Path]
) -> None:
    suite = "TLS_AES_128_GCM_SHA256"
    port = start_server(spawn, s_server_argv(cert_files, suite, []))
    client = connect(port, suite)
    client.ktls.sendmsg(b"abc\n")

    errors = []
    for _ in range(2):
        with pytest.raises(OSError) as excinfo:
            client.ktls.read_sock()
        errors.append(errno_of(excinfo))
    tickets = [client.ktls.recvmsg(65536) for _ in range(2)]

    assert errors == [errno.EINVAL] * 2
    assert handshake_messages(tickets) == [NEW_SESSION_TICKET] * 2
    assert client.ktls.read_sock() == b"cba\n"


@needs_openssl
@pytest.mark.parametrize("suite", SUITE_NAMES)
def test_openssl_key_update_both_directions(
    spawn: Spawner,
    connect: Callable[[int, str], Client],
    cert_files: tuple[Path, Path],
    registry: ULPRegistry,
    suite: str,
) -> None:
    port = start_server(spawn, s_server_argv(cert_files, suite, ["-num_tickets", "0"]))
    client = connect(port, suite)
    sock, s = client.ktls.sock, client.suite
    client_next = tk.next_traffic_secret(s, client.secrets["CLIENT_TRAFFIC_SECRET_0"])
    server_next = tk.next_traffic_secret(s, client.secrets["SERVER_TRAFFIC_SECRET_0"])

    # Our KeyUpdate asks OpenSSL to update too; it answers before its next data record.
    client.ktls.sendmsg(KEY_UPDATE_REQUESTED, HANDSHAKE)
    registry.setsockopt(sock, SOL_TLS, TLS_TX, tk.crypto_info_tls13(s, client_next))
    client.ktls.sendmsg(b"detadpu\n")

    assert client.ktls.recvmsg(65536) == (HANDSHAKE, KEY_UPDATE_NOT_REQUESTED)
    with pytest.raises(OSError) as excinfo:
        client.ktls.recvmsg(65536)
    assert errno_of(excinfo) == errno.EKEYEXPIRED
    registry.setsockopt(sock, SOL_TLS, TLS_RX, tk.crypto_info_tls13(s, server_next))
    assert client.ktls.recvmsg(65536) == (APPLICATION_DATA, b"updated\n")


GNUTLS_CIPHERS = {
    "TLS_AES_128_GCM_SHA256": "AES-128-GCM",
    "TLS_AES_256_GCM_SHA384": "AES-256-GCM",
    "TLS_AES_128_CCM_SHA256": "AES-128-CCM",
    "TLS_CHACHA20_POLY1305_SHA256": "CHACHA20-POLY1305",
}


@needs_gnutls
@pytest.mark.parametrize("suite", SUITE_NAMES)
def test_gnutls_echo_server_exchanges_data_with_the_model(
    spawn: Spawner,
    connect: Callable[[int, str], Client],
    cert_files: tuple[Path, Path],
    suite: str,
) -> None:
    priority = f"NORMAL:-VERS-ALL:+VERS-TLS1.3:-CIPHER-ALL:+{GNUTLS_CIPHERS[suite]}"

    def argv(port: int) -> list[str]:
        assert GNUTLS_SERV is not None
        return [
            GNUTLS_SERV,
            "--echo",
            "--disable-client-cert",
            "-p",
            str(port),
            f"--priority={priority}",
            f"--x509certfile={cert_files[0]}",
            f"--x509keyfile={cert_files[1]}",
        ]

    client = connect(start_server(spawn, argv), suite)
    # Echo mode works on text lines (it parses each line for commands).
    payload = b"".join(os.urandom(500).hex().encode() + b"\n" for _ in range(60))

    sender = send_in_thread(client.ktls, payload)
    data, others = read_data(client.ktls, len(payload))
    sender.join(TIMEOUT)

    assert data == payload
    assert set(handshake_messages(others)) <= {NEW_SESSION_TICKET}


def _read_until(stream: IO[bytes], wanted: bytes) -> bytes:
    seen = b""
    deadline = time.monotonic() + TIMEOUT
    while wanted not in seen:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([stream], [], [], max(left, 0))
        chunk = os.read(stream.fileno(), 65536) if ready else b""
        if not chunk:
            break
        seen += chunk
    return seen


def serve_ktls(
    registry: ULPRegistry, sock: socket.socket, suite: tk.Suite, cert_files: tuple[Path, Path]
) -> KTLSSocket:
    """The server side: pyOpenSSL handshake, then the model takes over the socket."""
    secrets: dict[str, bytes] = {}
    sock.settimeout(TIMEOUT)
    conn = SSL.Connection(tls13_context(suite, secrets, cert_files), None)
    conn.set_accept_state()
    # OpenSSL writes its NewSessionTickets right after the client's Finished, under the
    # application key: they are the first TX records, so rec_seq starts after them.
    tickets = count_records(handshake(conn, sock))
    server, client = secrets["SERVER_TRAFFIC_SECRET_0"], secrets["CLIENT_TRAFFIC_SECRET_0"]
    return install(registry, sock, suite, tx=server, rx=client, tx_seq=tickets)


@needs_openssl
@pytest.mark.parametrize("suite", ["TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"])
def test_model_as_server_talks_to_openssl_s_client(
    spawn: Spawner, registry: ULPRegistry, cert_files: tuple[Path, Path], suite: str
) -> None:
    assert OPENSSL is not None
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT)
        port = listener.getsockname()[1]
        argv = [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3"]
        argv += ["-ciphersuites", suite, "-quiet"]
        client = spawn(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        sock, _ = listener.accept()
    ktls = serve_ktls(registry, sock, tk.SUITES[suite], cert_files)
    assert ktls.tx_record_seq == 2  # OpenSSL's two default NewSessionTickets went first
    assert client.stdin is not None and client.stdout is not None

    try:
        client.stdin.write(b"ping from s_client\n")
        client.stdin.flush()
        received = ktls.recvmsg(65536)
        ktls.sendmsg(b"pong from kernel-sim\n")
        echoed = _read_until(client.stdout, b"pong from kernel-sim\n")
    finally:
        ktls.close()

    assert received == (APPLICATION_DATA, b"ping from s_client\n")
    assert b"pong from kernel-sim\n" in echoed
