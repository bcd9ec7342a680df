"""tlshd.handshake.secrets: RFC 8448 vectors, key-log parsing, and a real OpenSSL.

The OpenSSL cross-check runs a TLS 1.3 handshake between two pyOpenSSL
connections over memory BIOs, keeps every byte each side wrote, and opens the
records itself with keys derived from the key-log secrets. That proves the
derivation agrees with OpenSSL for every suite kTLS supports, including the
record sequence numbers the server's NewSessionTickets consume and the
KeyUpdate secret chain ("traffic upd").
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import hmac
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESCCM, AESGCM, ChaCha20Poly1305
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st
from OpenSSL import SSL

from tests.vectors import rfc8448 as v
from tlshd.errors import DecodeError
from tlshd.handshake import _openssl
from tlshd.handshake.secrets import (
    CLIENT_TRAFFIC_SECRET_0,
    SERVER_TRAFFIC_SECRET_0,
    HashAlg,
    KeylogEntry,
    MissingSecretError,
    Role,
    SecretCollector,
    TrafficKeys,
    derive_traffic_keys,
    encode_hkdf_label,
    hkdf_expand_label,
    next_traffic_secret,
    parse_keylog_line,
)
from tlshd.ktls import CipherSuite, ktls_params_from_secrets, suite_from_openssl_name

CLIENT_RANDOM = bytes(range(0x40, 0x60))
SECRET_A = bytes(range(0xA0, 0xC0))
SECRET_B = bytes(range(0xC0, 0xE0))


def keylog_line(label: str, client_random: bytes, secret: bytes) -> bytes:
    return f"{label} {client_random.hex()} {secret.hex()}".encode()


def assert_no_secret_text(text: str, *secrets: bytes) -> None:
    """None of the secrets appears in ``text`` as hex (either case) or as a bytes repr."""
    for secret in secrets:
        for needle in (secret.hex(), secret.hex().upper(), repr(secret)[2:-1], secret.hex()[:16]):
            assert needle not in text


# --- HKDF-Expand-Label and the key schedule against RFC 8448 section 3 ---------


def test_hkdf_label_encoding_matches_the_rfc_info_octets() -> None:
    assert encode_hkdf_label(b"key", b"", 16) == v.KEY_INFO_16
    assert encode_hkdf_label(b"iv", b"", 12) == v.IV_INFO_12
    assert (
        encode_hkdf_label(b"s hs traffic", v.HANDSHAKE_TRANSCRIPT_HASH, 32)
        == v.SERVER_HS_TRAFFIC_INFO
    )


@pytest.mark.parametrize(
    ("prk", "label", "transcript_hash", "expected"),
    [
        (
            v.HANDSHAKE_SECRET,
            b"c hs traffic",
            v.HANDSHAKE_TRANSCRIPT_HASH,
            v.CLIENT_HS_TRAFFIC_SECRET,
        ),
        (
            v.HANDSHAKE_SECRET,
            b"s hs traffic",
            v.HANDSHAKE_TRANSCRIPT_HASH,
            v.SERVER_HS_TRAFFIC_SECRET,
        ),
        (
            v.MASTER_SECRET,
            b"c ap traffic",
            v.APPLICATION_TRANSCRIPT_HASH,
            v.CLIENT_AP_TRAFFIC_SECRET,
        ),
        (
            v.MASTER_SECRET,
            b"s ap traffic",
            v.APPLICATION_TRANSCRIPT_HASH,
            v.SERVER_AP_TRAFFIC_SECRET,
        ),
    ],
    ids=["c-hs-traffic", "s-hs-traffic", "c-ap-traffic", "s-ap-traffic"],
)
def test_hkdf_expand_label_derives_the_rfc_traffic_secrets(
    prk: bytes, label: bytes, transcript_hash: bytes, expected: bytes
) -> None:
    # Derive-Secret(Secret, Label, Messages) = HKDF-Expand-Label(Secret, Label,
    # Transcript-Hash(Messages), Hash.length)  -- RFC 8446 section 7.1
    assert hkdf_expand_label(HashAlg.SHA256, prk, label, transcript_hash, 32) == expected


@pytest.mark.parametrize(
    ("secret", "key", "iv"),
    [
        (v.SERVER_HS_TRAFFIC_SECRET, v.SERVER_HS_KEY, v.SERVER_HS_IV),
        (v.CLIENT_HS_TRAFFIC_SECRET, v.CLIENT_HS_KEY, v.CLIENT_HS_IV),
        (v.SERVER_AP_TRAFFIC_SECRET, v.SERVER_AP_KEY, v.SERVER_AP_IV),
        (v.CLIENT_AP_TRAFFIC_SECRET, v.CLIENT_AP_KEY, v.CLIENT_AP_IV),
    ],
    ids=["server-handshake", "client-handshake", "server-application", "client-application"],
)
def test_derive_traffic_keys_gives_the_rfc_write_keys(secret: bytes, key: bytes, iv: bytes) -> None:
    assert derive_traffic_keys(HashAlg.SHA256, secret, 16) == TrafficKeys(key=key, iv=iv)


@pytest.mark.parametrize(
    ("secret", "record", "seq"),
    [
        (v.CLIENT_AP_TRAFFIC_SECRET, v.CLIENT_AP_RECORD, v.CLIENT_AP_RECORD_SEQ),
        (v.SERVER_AP_TRAFFIC_SECRET, v.SERVER_AP_RECORD, v.SERVER_AP_RECORD_SEQ),
    ],
    ids=["client", "server"],
)
def test_derived_keys_open_the_rfc_application_records(
    secret: bytes, record: bytes, seq: int
) -> None:
    keys = derive_traffic_keys(HashAlg.SHA256, secret, 16)
    assert open_record(CipherSuite.TLS_AES_128_GCM_SHA256, keys, seq, record) == (
        CONTENT_APPLICATION_DATA,
        v.APPLICATION_PAYLOAD,
    )


def reference_expand_label(alg: HashAlg, secret: bytes, label: bytes, length: int) -> bytes:
    """RFC 5869 HKDF-Expand with an HkdfLabel assembled by hand: an independent oracle."""
    digest = getattr(hashlib, alg.value)
    full = b"tls13 " + label
    info = length.to_bytes(2, "big") + bytes([len(full)]) + full + b"\x00"
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(secret, block + info + bytes([counter]), digest).digest()
        out, counter = out + block, counter + 1
    return out[:length]


@pytest.mark.parametrize("alg", list(HashAlg))
def test_next_traffic_secret_is_expand_label_traffic_upd(alg: HashAlg) -> None:
    secret_0 = bytes(range(alg.digest_size))
    secret_1 = next_traffic_secret(alg, secret_0)
    secret_2 = next_traffic_secret(alg, secret_1)
    assert secret_1 == reference_expand_label(alg, secret_0, b"traffic upd", alg.digest_size)
    assert secret_2 == reference_expand_label(alg, secret_1, b"traffic upd", alg.digest_size)
    assert len({secret_0, secret_1, secret_2}) == 3


def test_next_traffic_secret_of_the_rfc_server_secret_matches_the_reference() -> None:
    expected = reference_expand_label(
        HashAlg.SHA256, v.SERVER_AP_TRAFFIC_SECRET, b"traffic upd", 32
    )
    assert next_traffic_secret(HashAlg.SHA256, v.SERVER_AP_TRAFFIC_SECRET) == expected


@pytest.mark.parametrize(
    ("alg", "size", "oid_name"), [(HashAlg.SHA256, 32, "sha256"), (HashAlg.SHA384, 48, "sha384")]
)
def test_hash_alg_sizes_and_objects(alg: HashAlg, size: int, oid_name: str) -> None:
    assert alg.digest_size == size
    assert alg.hash_object().name == oid_name
    assert isinstance(alg.hash_object(), hashes.HashAlgorithm)


@pytest.mark.parametrize(
    "call",
    [
        lambda: derive_traffic_keys(HashAlg.SHA384, SECRET_A, 32),  # 32-byte secret, SHA-384
        lambda: next_traffic_secret(HashAlg.SHA256, SECRET_A[:31]),
        lambda: hkdf_expand_label(HashAlg.SHA256, b"", b"key", b"", 16),
        lambda: hkdf_expand_label(HashAlg.SHA256, SECRET_A, b"", b"", 16),
        lambda: hkdf_expand_label(HashAlg.SHA256, SECRET_A, b"x" * 250, b"", 16),
        lambda: hkdf_expand_label(HashAlg.SHA256, SECRET_A, b"key", b"x" * 256, 16),
        lambda: hkdf_expand_label(HashAlg.SHA256, SECRET_A, b"key", b"", 0),
        lambda: hkdf_expand_label(HashAlg.SHA256, SECRET_A, b"key", b"", 255 * 32 + 1),
        lambda: TrafficKeys(key=SECRET_A[:16], iv=SECRET_A[:8]),
    ],
    ids=[
        "secret-size-vs-hash",
        "short-secret",
        "empty-secret",
        "empty-label",
        "long-label",
        "long-context",
        "zero-length",
        "too-long-output",
        "short-iv",
    ],
)
def test_misuse_raises_value_error_without_secret_bytes(call: Callable[[], object]) -> None:
    with pytest.raises(ValueError) as info:
        call()
    assert_no_secret_text(str(info.value), SECRET_A)


# --- key-log lines -----------------------------------------------------------------


def test_parse_keylog_line_reads_the_three_fields() -> None:
    entry = parse_keylog_line(keylog_line(SERVER_TRAFFIC_SECRET_0, CLIENT_RANDOM, SECRET_A))
    assert entry == KeylogEntry(SERVER_TRAFFIC_SECRET_0, CLIENT_RANDOM, SECRET_A)


@pytest.mark.parametrize("suffix", [b"", b"\n", b"\r\n"])
def test_parse_keylog_line_tolerates_one_line_ending(suffix: bytes) -> None:
    line = keylog_line("EXPORTER_SECRET", CLIENT_RANDOM, SECRET_B) + suffix
    assert parse_keylog_line(line).secret == SECRET_B


def test_parse_keylog_line_accepts_upper_case_hex_and_48_byte_secrets() -> None:
    secret = bytes(range(48))
    line = f"CLIENT_TRAFFIC_SECRET_0 {CLIENT_RANDOM.hex().upper()} {secret.hex().upper()}"
    entry = parse_keylog_line(line.encode())
    assert (entry.client_random, entry.secret) == (CLIENT_RANDOM, secret)


GOOD = keylog_line(CLIENT_TRAFFIC_SECRET_0, CLIENT_RANDOM, SECRET_A)


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"\n",
        GOOD.replace(b" ", b"  ", 1),
        GOOD.replace(b" ", b"\t"),
        b" " + GOOD,
        GOOD + b" ",
        GOOD + b"\n\n",
        GOOD + b" extra",
        GOOD[:-1],  # odd number of hex digits
        GOOD.replace(b"CLIENT", b"client"),
        GOOD.replace(CLIENT_RANDOM.hex().encode(), CLIENT_RANDOM.hex().encode()[:-2]),
        GOOD.replace(CLIENT_RANDOM.hex().encode(), CLIENT_RANDOM.hex().encode() + b"00"),
        GOOD.replace(SECRET_A.hex().encode(), b"zz" + SECRET_A.hex().encode()[2:]),
        GOOD.replace(SECRET_A.hex().encode(), b""),
        keylog_line(CLIENT_TRAFFIC_SECRET_0, CLIENT_RANDOM, bytes(1025)),
        b"\xff" + GOOD,
        GOOD.replace(b" ", b"\x00", 1),
        "CLIENT_TRAFFIC_SECRET_0 \uff14\uff10 00".encode(),  # full-width digits
    ],
)
def test_malformed_keylog_lines_raise_decode_error_without_echoing_the_line(line: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        parse_keylog_line(line)
    assert info.value.status == errno.EINVAL
    assert info.value.__cause__ is None
    assert_no_secret_text(str(info.value), SECRET_A, CLIENT_RANDOM)


def test_every_prefix_short_of_a_whole_secret_byte_is_rejected() -> None:
    # Fed a byte at a time, a line only becomes valid once the secret field
    # holds whole bytes; then it is a (shorter) valid line.
    secret_start = GOOD.rindex(b" ") + 1
    for end in range(len(GOOD)):
        digits = end - secret_start
        if digits >= 2 and digits % 2 == 0:
            assert parse_keylog_line(GOOD[:end]).secret == SECRET_A[: digits // 2]
        else:
            with pytest.raises(DecodeError):
                parse_keylog_line(GOOD[:end])


@given(st.binary(max_size=400))
def test_garbage_raises_only_decode_error(line: bytes) -> None:
    try:
        entry = parse_keylog_line(line)
    except DecodeError:
        return
    assert isinstance(entry, KeylogEntry)


@given(st.data())
def test_single_byte_mutations_raise_only_decode_error(data: st.DataObject) -> None:
    index = data.draw(st.integers(0, len(GOOD) - 1))
    byte = data.draw(st.integers(0, 255))
    line = GOOD[:index] + bytes([byte]) + GOOD[index + 1 :]
    try:
        entry = parse_keylog_line(line)
    except DecodeError as exc:
        assert_no_secret_text(str(exc), SECRET_A)
        return
    assert keylog_line(entry.label, entry.client_random, entry.secret).lower() == line.lower()


@given(st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_ abcdef\n", max_size=200))
def test_near_miss_text_raises_only_decode_error(text: str) -> None:
    with contextlib.suppress(DecodeError):
        parse_keylog_line(text.encode())


# --- SecretCollector -----------------------------------------------------------------


def full_collector() -> SecretCollector:
    collector = SecretCollector()
    collector.add_line(keylog_line("SERVER_HANDSHAKE_TRAFFIC_SECRET", CLIENT_RANDOM, SECRET_B))
    collector.add_line(keylog_line(CLIENT_TRAFFIC_SECRET_0, CLIENT_RANDOM, SECRET_A))
    collector.add_line(keylog_line(SERVER_TRAFFIC_SECRET_0, CLIENT_RANDOM, SECRET_B))
    return collector


def test_client_sends_with_the_client_secret_and_receives_with_the_server_secret() -> None:
    assert full_collector().application_secrets(Role.CLIENT) == (SECRET_A, SECRET_B)


def test_server_sends_with_the_server_secret_and_receives_with_the_client_secret() -> None:
    assert full_collector().application_secrets(Role.SERVER) == (SECRET_B, SECRET_A)


@pytest.mark.parametrize(
    ("present", "missing"),
    [
        (CLIENT_TRAFFIC_SECRET_0, SERVER_TRAFFIC_SECRET_0),
        (SERVER_TRAFFIC_SECRET_0, CLIENT_TRAFFIC_SECRET_0),
    ],
)
def test_a_missing_application_secret_raises_missing_secret_error(
    present: str, missing: str
) -> None:
    collector = SecretCollector()
    collector.add_line(keylog_line(present, CLIENT_RANDOM, SECRET_A))
    with pytest.raises(MissingSecretError, match=missing) as info:
        collector.application_secrets(Role.CLIENT)
    assert info.value.status == errno.EIO
    assert_no_secret_text(str(info.value), SECRET_A)


def test_an_empty_collector_says_it_has_nothing() -> None:
    with pytest.raises(MissingSecretError, match="have: nothing"):
        SecretCollector().application_secrets(Role.SERVER)


def test_a_line_from_another_connection_is_rejected() -> None:
    collector = full_collector()
    other = bytes(32)
    with pytest.raises(DecodeError, match="another connection") as info:
        collector.add_line(keylog_line("EXPORTER_SECRET", other, SECRET_A))
    assert_no_secret_text(str(info.value), SECRET_A, CLIENT_RANDOM)
    assert "EXPORTER_SECRET" not in collector.labels


def test_a_repeated_line_is_ignored_and_a_conflicting_one_rejected() -> None:
    collector = full_collector()
    collector.add_line(keylog_line(CLIENT_TRAFFIC_SECRET_0, CLIENT_RANDOM, SECRET_A))
    with pytest.raises(DecodeError, match="different values") as info:
        collector.add_line(keylog_line(CLIENT_TRAFFIC_SECRET_0, CLIENT_RANDOM, SECRET_B))
    assert_no_secret_text(str(info.value), SECRET_A, SECRET_B)
    assert collector.application_secrets(Role.CLIENT) == (SECRET_A, SECRET_B)
    assert len(collector) == 3


# --- nothing that holds a secret prints it ------------------------------------------


def secret_holders() -> Iterator[object]:
    yield TrafficKeys(key=SECRET_A[:16], iv=SECRET_B[:12])
    yield derive_traffic_keys(HashAlg.SHA256, SECRET_A, 32)
    yield parse_keylog_line(keylog_line(CLIENT_TRAFFIC_SECRET_0, CLIENT_RANDOM, SECRET_A))
    yield KeylogEntry(SERVER_TRAFFIC_SECRET_0, CLIENT_RANDOM, SECRET_B)
    yield full_collector()


@pytest.mark.parametrize("holder", list(secret_holders()), ids=lambda o: type(o).__name__)
def test_repr_and_str_never_show_secret_bytes(holder: object) -> None:
    derived = derive_traffic_keys(HashAlg.SHA256, SECRET_A, 32)
    for text in (repr(holder), str(holder), f"{holder}", f"{holder!r}", repr([holder])):
        assert_no_secret_text(text, SECRET_A, SECRET_B, SECRET_A[:16], derived.key, derived.iv)
    assert "bytes>" in repr(holder) or "labels=" in repr(holder)


# --- TLS 1.3 records (RFC 8446 section 5), enough to check OpenSSL's output ------------

CONTENT_HANDSHAKE = 22
CONTENT_APPLICATION_DATA = 23
HANDSHAKE_NEW_SESSION_TICKET = 4
HANDSHAKE_FINISHED = 20
HANDSHAKE_KEY_UPDATE = 24

_AEADS: dict[CipherSuite, Callable[[bytes], AESGCM | AESCCM | ChaCha20Poly1305]] = {
    CipherSuite.TLS_AES_128_GCM_SHA256: AESGCM,
    CipherSuite.TLS_AES_256_GCM_SHA384: AESGCM,
    CipherSuite.TLS_AES_128_CCM_SHA256: AESCCM,  # 16-byte tag, the default
    CipherSuite.TLS_CHACHA20_POLY1305_SHA256: ChaCha20Poly1305,
}


def nonce(iv: bytes, seq: int) -> bytes:
    """RFC 8446 section 5.3: the sequence number, left-padded to the IV length, XOR the IV."""
    return bytes(a ^ b for a, b in zip(iv, seq.to_bytes(len(iv), "big"), strict=True))


def open_record(
    suite: CipherSuite, keys: TrafficKeys, seq: int, record: bytes
) -> tuple[int, bytes]:
    """Decrypt one TLSCiphertext; returns (inner content type, content)."""
    header, body = record[:5], record[5:]
    assert header[0] == CONTENT_APPLICATION_DATA and len(body) == int.from_bytes(header[3:5])
    inner = _AEADS[suite](keys.key).decrypt(nonce(keys.iv, seq), body, header)
    inner = inner.rstrip(b"\x00")  # TLSInnerPlaintext padding
    return inner[-1], inner[:-1]


def seal_record(
    suite: CipherSuite, keys: TrafficKeys, seq: int, content_type: int, data: bytes
) -> bytes:
    inner = data + bytes([content_type])
    header = struct.pack("!BHH", CONTENT_APPLICATION_DATA, 0x0303, len(inner) + 16)
    return header + _AEADS[suite](keys.key).encrypt(nonce(keys.iv, seq), inner, header)


def split_records(wire: bytes) -> list[bytes]:
    records = []
    while wire:
        length = int.from_bytes(wire[3:5])
        records.append(wire[: 5 + length])
        wire = wire[5 + length :]
    return records


def handshake_types(data: bytes) -> list[int]:
    types = []
    while data:
        types.append(data[0])
        data = data[4 + int.from_bytes(data[1:4]) :]
    return types


@dataclass(frozen=True)
class Opened:
    generation: int  # 0 = application_traffic_secret_0, 1 after one KeyUpdate, ...
    seq: int
    content_type: int
    data: bytes


def open_flight(
    suite: CipherSuite, wire: bytes, hs_secret: bytes, ap_secret: bytes
) -> list[Opened]:
    """Open every protected record one side wrote; return those after its Finished.

    Follows the sender's key changes: handshake keys until Finished, then the
    application secret, then the next generation after each KeyUpdate, with
    the sequence number reset at each change (RFC 8446 section 5.3).
    """
    alg = suite.hash_alg
    keys, seq, generation, secret = (
        derive_traffic_keys(alg, hs_secret, suite.key_len),
        0,
        -1,
        ap_secret,
    )
    opened = []
    for record in split_records(wire):
        if record[0] != CONTENT_APPLICATION_DATA:
            continue  # ClientHello/ServerHello and middlebox-compat ChangeCipherSpec
        content_type, data = open_record(suite, keys, seq, record)
        if generation >= 0:
            opened.append(Opened(generation, seq, content_type, data))
        seq += 1
        types = handshake_types(data) if content_type == CONTENT_HANDSHAKE else []
        if HANDSHAKE_FINISHED in types or HANDSHAKE_KEY_UPDATE in types:
            if generation >= 0:
                secret = next_traffic_secret(alg, secret)
            keys, seq, generation = (
                derive_traffic_keys(alg, secret, suite.key_len),
                0,
                generation + 1,
            )
    return opened


# --- a real OpenSSL pair over memory BIOs -------------------------------------------------


Credentials = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


@pytest.fixture(scope="module")
def server_credentials() -> Credentials:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tlshd-test")])
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
    return cert, key


@dataclass(repr=False)  # the default repr would print ``logged``
class Peer:
    """One pyOpenSSL end: its key log and every byte it ever wrote."""

    keylog: SecretCollector = field(default_factory=SecretCollector)
    logged: dict[str, bytes] = field(default_factory=dict)
    wire: bytearray = field(default_factory=bytearray)
    done: bool = False
    conn: SSL.Connection = field(init=False)

    def drain(self) -> bytes:
        out = b""
        while True:
            try:
                out += self.conn.bio_read(65536)
            except SSL.WantReadError:
                break
        self.wire += out
        return out

    def on_keylog(self, _conn: SSL.Connection, line: bytes) -> None:
        entry = self.keylog.add_line(line)
        self.logged[entry.label] = entry.secret


def make_peer(suite: CipherSuite, creds: Credentials | None) -> Peer:
    peer = Peer()
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    _openssl.set_tls13_ciphersuites(ctx, suite.openssl_name.encode())  # CCM must be asked for
    ctx.set_keylog_callback(peer.on_keylog)
    if creds is not None:
        ctx.use_certificate(creds[0])
        ctx.use_privatekey(creds[1])
    peer.conn = SSL.Connection(ctx, None)
    if creds is None:
        peer.conn.set_connect_state()
    else:
        peer.conn.set_accept_state()
    return peer


def run_handshake(client: Peer, server: Peer) -> None:
    for _ in range(20):
        for peer in (client, server):
            if not peer.done:
                try:
                    peer.conn.do_handshake()
                    peer.done = True
                except SSL.WantReadError:
                    pass
        to_server, to_client = client.drain(), server.drain()
        if to_server:
            server.conn.bio_write(to_server)
        if to_client:
            client.conn.bio_write(to_client)
        if client.done and server.done and not (to_server or to_client):
            return
    raise AssertionError("handshake did not finish")


@pytest.fixture(params=list(CipherSuite), ids=lambda s: s.name)
def tls_pair(
    request: pytest.FixtureRequest, server_credentials: Credentials
) -> tuple[CipherSuite, Peer, Peer]:
    suite: CipherSuite = request.param
    client, server = make_peer(suite, None), make_peer(suite, server_credentials)
    run_handshake(client, server)
    return suite, client, server


def server_flight(suite: CipherSuite, server: Peer) -> list[Opened]:
    return open_flight(
        suite,
        bytes(server.wire),
        server.logged["SERVER_HANDSHAKE_TRAFFIC_SECRET"],
        server.logged[SERVER_TRAFFIC_SECRET_0],
    )


def test_openssl_names_the_suite_as_the_kernel_mapping_expects(
    tls_pair: tuple[CipherSuite, Peer, Peer],
) -> None:
    suite, client, server = tls_pair
    assert client.conn.get_protocol_version_name() == "TLSv1.3"
    assert suite_from_openssl_name(client.conn.get_cipher_name()) is suite
    assert suite_from_openssl_name(server.conn.get_cipher_name()) is suite


def test_both_ends_log_the_same_application_secrets(
    tls_pair: tuple[CipherSuite, Peer, Peer],
) -> None:
    suite, client, server = tls_pair
    client_tx, client_rx = client.keylog.application_secrets(Role.CLIENT)
    server_tx, server_rx = server.keylog.application_secrets(Role.SERVER)
    assert (client_tx, client_rx) == (server_rx, server_tx)
    assert len(client_tx) == suite.hash_alg.digest_size


def test_derived_keys_open_openssl_records_after_its_session_tickets(
    tls_pair: tuple[CipherSuite, Peer, Peer],
) -> None:
    suite, client, server = tls_pair
    server.conn.send(b"from the server")
    client.conn.send(b"from the client")
    server.drain()
    client.drain()

    *tickets, data = server_flight(suite, server)
    from_client = open_flight(
        suite,
        bytes(client.wire),
        client.logged["CLIENT_HANDSHAKE_TRAFFIC_SECRET"],
        client.logged[CLIENT_TRAFFIC_SECRET_0],
    )

    assert tickets, "OpenSSL sends NewSessionTickets by default"
    assert all(handshake_types(t.data) == [HANDSHAKE_NEW_SESSION_TICKET] for t in tickets)
    assert [t.seq for t in tickets] == list(range(len(tickets)))
    assert data == Opened(0, len(tickets), CONTENT_APPLICATION_DATA, b"from the server")
    assert from_client == [Opened(0, 0, CONTENT_APPLICATION_DATA, b"from the client")]


def kernel_fields(suite: CipherSuite, crypto_info: bytes) -> tuple[bytes, bytes, int]:
    """(key, salt || iv, rec_seq) read back out of a crypto_info, as tls_sw.c uses them."""
    iv_size = 12 if suite is CipherSuite.TLS_CHACHA20_POLY1305_SHA256 else 8
    key_end = 4 + iv_size + suite.key_len
    iv, key = crypto_info[4 : 4 + iv_size], crypto_info[4 + iv_size : key_end]
    salt = crypto_info[key_end : key_end + 12 - iv_size]
    return key, salt + iv, int.from_bytes(crypto_info[-8:], "big")


def test_ktls_params_open_openssl_records_the_way_the_kernel_would(
    tls_pair: tuple[CipherSuite, Peer, Peer],
) -> None:
    # The server hands its socket to kTLS after its tickets: rec_seq = tickets sent.
    suite, _client, server = tls_pair
    tickets = len(server_flight(suite, server))
    server.conn.send(b"kernel view")
    record = split_records(server.drain())[-1]
    tx_secret, rx_secret = server.keylog.application_secrets(Role.SERVER)

    params = ktls_params_from_secrets(suite, tx_secret, rx_secret, tx_seq=tickets)

    key, salt_iv, rec_seq = kernel_fields(suite, params.tx_crypto_info)
    inner = _AEADS[suite](key).decrypt(nonce(salt_iv, rec_seq), record[5:], record[:5])
    assert inner == b"kernel view" + bytes([CONTENT_APPLICATION_DATA])


def test_openssl_agrees_with_next_traffic_secret_across_a_key_update(
    tls_pair: tuple[CipherSuite, Peer, Peer],
) -> None:
    suite, client, server = tls_pair
    alg, key_len = suite.hash_alg, suite.key_len
    client_secret = client.logged[CLIENT_TRAFFIC_SECRET_0]
    keys_0 = derive_traffic_keys(alg, client_secret, key_len)
    keys_1 = derive_traffic_keys(alg, next_traffic_secret(alg, client_secret), key_len)
    key_update_requested = bytes([HANDSHAKE_KEY_UPDATE, 0, 0, 1, 1])

    # We play the client: KeyUpdate(update_requested) under generation 0, then
    # data under generation 1. OpenSSL returns the data only if it derived the
    # same next client secret.
    server.conn.bio_write(seal_record(suite, keys_0, 0, CONTENT_HANDSHAKE, key_update_requested))
    with pytest.raises(SSL.WantReadError):
        server.conn.recv(100)
    server.conn.bio_write(seal_record(suite, keys_1, 0, CONTENT_APPLICATION_DATA, b"client gen 1"))
    assert server.conn.recv(100) == b"client gen 1"

    # OpenSSL answers with its own KeyUpdate, then protects data under its next secret.
    server.conn.send(b"server gen 1")
    server.drain()
    update, data = server_flight(suite, server)[-2:]
    assert (update.generation, handshake_types(update.data)) == (0, [HANDSHAKE_KEY_UPDATE])
    assert update.data[4] == 0  # update_not_requested
    assert data == Opened(1, 0, CONTENT_APPLICATION_DATA, b"server gen 1")


def test_open_record_rejects_a_wrong_sequence_number() -> None:
    keys = derive_traffic_keys(HashAlg.SHA256, v.SERVER_AP_TRAFFIC_SECRET, 16)
    with pytest.raises(InvalidTag):
        open_record(CipherSuite.TLS_AES_128_GCM_SHA256, keys, 0, v.SERVER_AP_RECORD)
