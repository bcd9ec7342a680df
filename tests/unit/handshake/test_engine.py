"""HandshakeEngine: two engines in memory, and engines against plain pyOpenSSL peers.

The peers exchange bytes through in-memory "wires". An engine's reader obeys
NeedData (never takes more than ``max_bytes``) unless a test says otherwise, so
what is left on a wire after the handshake is exactly what the kernel would
find on the socket. Secrets are proven right by protecting/unprotecting real
records with them (RFC 8446 section 5.2/7.3) against the plain peer.
"""

from __future__ import annotations

import errno
import itertools
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESCCM, AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from OpenSSL import SSL

from tests.pki import PKI, issue_leaf, write_issued, write_pki
from tlshd.credentials import builders as credentials
from tlshd.errors import (
    PeerAuthenticationError,
    PeerClosedError,
    PeerProtocolError,
    TlshdError,
    UnsupportedRequestError,
)
from tlshd.handshake import _openssl
from tlshd.handshake.engine import HandshakeEngine, Role, count_records
from tlshd.handshake.events import HandshakeComplete, HandshakeFailed, NeedData, SessionResult

ALERT, HANDSHAKE, APPLICATION_DATA, CCS = 21, 22, 23, 20
SUITES = (
    "TLS_AES_128_GCM_SHA256",
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
    "TLS_AES_128_CCM_SHA256",  # not enabled by OpenSSL by default
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return write_pki(tmp_path_factory.mktemp("pki"))


# -- record helpers --------------------------------------------------------------


def split_records(data: bytes) -> list[bytes]:
    records, offset = [], 0
    while offset < len(data):
        end = offset + 5 + int.from_bytes(data[offset + 3 : offset + 5], "big")
        assert end <= len(data), "partial record on the wire"
        records.append(data[offset:end])
        offset = end
    return records


def record_types(data: bytes) -> list[int]:
    return [record[0] for record in split_records(data)]


_AEADS = {
    "TLS_AES_128_GCM_SHA256": (AESGCM, 16, hashes.SHA256()),
    "TLS_AES_256_GCM_SHA384": (AESGCM, 32, hashes.SHA384()),
    "TLS_CHACHA20_POLY1305_SHA256": (ChaCha20Poly1305, 32, hashes.SHA256()),
    "TLS_AES_128_CCM_SHA256": (AESCCM, 16, hashes.SHA256()),
}


def _expand_label(
    secret: bytes, label: bytes, length: int, algorithm: hashes.HashAlgorithm
) -> bytes:
    full = b"tls13 " + label
    info = length.to_bytes(2, "big") + bytes([len(full)]) + full + b"\x00"
    return HKDFExpand(algorithm, length, info).derive(secret)


def _aead(suite: str, secret: bytes, seq: int) -> tuple[AESGCM | AESCCM | ChaCha20Poly1305, bytes]:
    cls, key_len, algorithm = _AEADS[suite]
    key = _expand_label(secret, b"key", key_len, algorithm)
    iv = _expand_label(secret, b"iv", 12, algorithm)
    nonce = bytes(a ^ b for a, b in zip(iv, seq.to_bytes(12, "big"), strict=True))
    return cls(key), nonce


def seal(suite: str, secret: bytes, seq: int, content_type: int, payload: bytes) -> bytes:
    aead, nonce = _aead(suite, secret, seq)
    inner = payload + bytes([content_type])
    header = bytes([APPLICATION_DATA, 3, 3]) + (len(inner) + 16).to_bytes(2, "big")
    return header + aead.encrypt(nonce, inner, header)


def unseal(suite: str, secret: bytes, seq: int, record: bytes) -> tuple[int, bytes]:
    aead, nonce = _aead(suite, secret, seq)
    inner = aead.decrypt(nonce, record[5:], record[:5]).rstrip(b"\x00")
    return inner[-1], inner[:-1]


# -- endpoints on in-memory wires ---------------------------------------------------


@dataclass
class EngineEnd:
    """An engine plus the caller loop the worker will run around it.

    ``chunk`` caps each read (1 = a byte at a time); ``greedy`` ignores NeedData
    and hands the engine everything on the wire at once.
    """

    engine: HandshakeEngine
    chunk: int | None = None
    greedy: bool = False
    inbox: bytearray = field(default_factory=bytearray)
    sent: bytearray = field(default_factory=bytearray)
    completing_output: bytes | None = None  # what went out in the step that completed
    sent_after_done: bytearray = field(default_factory=bytearray)
    max_requested: int = 0

    def pump(self) -> tuple[bytes, bool]:
        out = bytearray(self.engine.data_to_send())
        if self.done:
            self.sent_after_done += out
        consumed = False
        while not self.done and self.inbox:
            event = self.engine.next_event()
            assert isinstance(event, NeedData)
            self.max_requested = max(self.max_requested, event.max_bytes)
            take = len(self.inbox) if self.greedy else min(event.max_bytes, self.chunk or 1 << 30)
            data = bytes(self.inbox[:take])
            del self.inbox[:take]
            self.engine.receive_data(data)
            consumed = True
            step = self.engine.data_to_send()
            out += step
            if self.done:
                self.completing_output = step
        self.sent += out
        return bytes(out), consumed

    @property
    def done(self) -> bool:
        return not isinstance(self.engine.next_event(), NeedData)

    @property
    def session(self) -> SessionResult:
        event = self.engine.next_event()
        assert isinstance(event, HandshakeComplete), event
        return event.session

    @property
    def error(self) -> TlshdError:
        event = self.engine.next_event()
        assert isinstance(event, HandshakeFailed), event
        return event.error


def _plain_keylog(conn: SSL.Connection, line: bytes) -> None:
    label, _random, secret = line.split(b" ")
    conn.get_app_data()[label.decode()] = bytes.fromhex(secret.decode())


@dataclass
class PlainEnd:
    """An ordinary pyOpenSSL peer (OpenSSL defaults: server NewSessionTickets)."""

    conn: SSL.Connection
    app_data: bytes = b""  # sent right behind this peer's Finished, same chunk
    inbox: bytearray = field(default_factory=bytearray)
    sent: bytearray = field(default_factory=bytearray)
    completing_output: bytes | None = None
    keylog: dict[str, bytes] = field(default_factory=dict)
    done: bool = False
    error: SSL.Error | None = None
    received: bytearray = field(default_factory=bytearray)
    post_handshake_error: SSL.Error | None = None

    def __post_init__(self) -> None:
        self.conn.set_app_data(self.keylog)

    def pump(self) -> tuple[bytes, bool]:
        consumed = bool(self.inbox)
        if self.inbox:
            self.conn.bio_write(bytes(self.inbox))
            self.inbox.clear()
        was_done = self.done
        if self.done:
            self._read_application_data()
        elif self.error is None:
            self._handshake()
        out = _drain(self.conn)
        if self.done and not was_done:
            self.completing_output = out
        self.sent += out
        return out, consumed

    def _handshake(self) -> None:
        try:
            self.conn.do_handshake()
        except SSL.WantReadError:
            return
        except SSL.Error as exc:
            self.error = exc
            return
        self.done = True
        if self.app_data:
            self.conn.sendall(self.app_data)

    def _read_application_data(self) -> None:
        try:
            while True:
                self.received += self.conn.recv(65536)
        except SSL.WantReadError:
            pass
        except SSL.Error as exc:
            self.post_handshake_error = exc


def _drain(conn: SSL.Connection) -> bytes:
    out = bytearray()
    try:
        while True:
            out += conn.bio_read(65536)
    except SSL.WantReadError:
        return bytes(out)


End = EngineEnd | PlainEnd


def run(client: End, server: End, rounds: int = 100_000) -> None:
    """Shuttle bytes until neither side sends or consumes anything."""
    for _ in range(rounds):
        out_c, used_c = client.pump()
        server.inbox += out_c
        out_s, used_s = server.pump()
        client.inbox += out_s
        if not (out_c or used_c or out_s or used_s):
            return
    raise AssertionError("handshake did not settle")


def plain(ctx: SSL.Context, role: Role, app_data: bytes = b"") -> PlainEnd:
    conn = SSL.Connection(ctx, None)
    if role is Role.CLIENT:
        conn.set_connect_state()
        conn.set_tlsext_host_name(b"server.test")
    else:
        conn.set_accept_state()
    return PlainEnd(conn, app_data=app_data)


def plain_server_ctx(
    pki: PKI,
    *,
    cert: str = "server",
    max_version: int | None = None,
    verify_client: bool = False,
    ciphersuites: str | None = None,
) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    if max_version is not None:
        ctx.set_max_proto_version(max_version)
    files = getattr(pki, cert)
    ctx.use_certificate_file(str(files.cert))
    ctx.use_privatekey_file(str(files.key))
    if verify_client:
        ctx.load_verify_locations(str(pki.ca))
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
    if ciphersuites:
        _openssl.set_tls13_ciphersuites(ctx, ciphersuites.encode())
    ctx.set_keylog_callback(_plain_keylog)
    return ctx


def plain_client_ctx(
    pki: PKI, *, client_cert: bool = False, max_version: int | None = None
) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    if max_version is not None:
        ctx.set_max_proto_version(max_version)
    ctx.load_verify_locations(str(pki.ca))
    ctx.set_verify(SSL.VERIFY_PEER)
    if client_cert:
        ctx.use_certificate_file(str(pki.client.cert))
        ctx.use_privatekey_file(str(pki.client.key))
    ctx.set_keylog_callback(_plain_keylog)
    return ctx


def anon_client(
    pki: PKI,
    peername: str | None = "server.test",
    *,
    ciphersuites: str | None = None,
    chunk: int | None = None,
    greedy: bool = False,
) -> EngineEnd:
    ctx = credentials.client_context(pki.ca, ciphersuites=ciphersuites)
    engine = HandshakeEngine(ctx, Role.CLIENT, peername=peername)
    return EngineEnd(engine, chunk=chunk, greedy=greedy)


def x509_client(pki: PKI, peername: str = "server.test") -> EngineEnd:
    ctx = credentials.client_context(pki.ca, pki.client.cert, pki.client.key)
    return EngineEnd(HandshakeEngine(ctx, Role.CLIENT, peername=peername))


def engine_server(
    pki: PKI,
    *,
    cert: str = "server",
    require: bool = False,
    request: bool = True,
    ciphersuites: str | None = None,
    chunk: int | None = None,
    greedy: bool = False,
) -> EngineEnd:
    files = getattr(pki, cert)
    ctx = credentials.server_context(
        files.cert,
        files.key,
        pki.ca,
        require,
        request_client_cert=request,
        ciphersuites=ciphersuites,
    )
    return EngineEnd(HandshakeEngine(ctx, Role.SERVER), chunk=chunk, greedy=greedy)


def assert_matching_sessions(client: SessionResult, server: SessionResult) -> None:
    assert client.protocol == server.protocol == "TLSv1.3"
    assert client.cipher_name == server.cipher_name
    assert client.tx_secret == server.rx_secret
    assert client.rx_secret == server.tx_secret
    assert client.tx_secret != client.rx_secret
    assert (client.tx_seq, client.rx_seq, server.tx_seq, server.rx_seq) == (0, 0, 0, 0)


# -- success between two engines ---------------------------------------------------------


@pytest.mark.parametrize("request_cert", [False, True], ids=["not-requested", "optional"])
def test_anon_client_and_x509_server_agree(pki: PKI, request_cert: bool) -> None:
    client, server = anon_client(pki), engine_server(pki, request=request_cert)
    run(client, server)
    assert_matching_sessions(client.session, server.session)
    assert client.session.peer_certificate_der == pki.server.cert_der
    assert client.session.peer_chain_der[0] == pki.server.cert_der
    assert server.session.peer_certificate_der is None
    assert server.session.peer_chain_der == ()


def test_mutual_tls_reports_both_certificates(pki: PKI) -> None:
    client, server = x509_client(pki), engine_server(pki, require=True)
    run(client, server)
    assert_matching_sessions(client.session, server.session)
    assert server.session.peer_certificate_der == pki.client.cert_der
    ca_der = pki.ca_issued.cert_der
    assert server.session.peer_chain_der == (pki.client.cert_der, ca_der)
    assert client.session.peer_chain_der == (pki.server.cert_der, ca_der)
    assert client.session.peer_certificate_der == pki.server.cert_der


@pytest.mark.parametrize("suite", SUITES)
def test_each_tls13_suite_between_engines(pki: PKI, suite: str) -> None:
    client = anon_client(pki, ciphersuites=suite)
    server = engine_server(pki, ciphersuites=suite if "CCM" in suite else None)
    run(client, server)
    assert client.session.cipher_name == server.session.cipher_name == suite
    assert_matching_sessions(client.session, server.session)
    hash_len = 48 if suite.endswith("SHA384") else 32
    assert len(client.session.tx_secret) == hash_len


@pytest.mark.parametrize("cert", ["server", "server_rsa", "server_ed25519"])
def test_server_key_types(pki: PKI, cert: str) -> None:
    client, server = anon_client(pki), engine_server(pki, cert=cert)
    run(client, server)
    assert_matching_sessions(client.session, server.session)
    assert client.session.peer_certificate_der == getattr(pki, cert).cert_der


@pytest.mark.parametrize("peername", ["server.test", "localhost", "127.0.0.1", "::1", "[::1]"])
def test_peername_matches_dns_or_ip_san(pki: PKI, peername: str) -> None:
    client, server = anon_client(pki, peername=peername), engine_server(pki)
    run(client, server)
    assert_matching_sessions(client.session, server.session)


def _cn_only_server(pki: PKI, tmp_path: Path) -> EngineEnd:
    """A server whose certificate names server.test in its subject CN and nowhere else."""
    files = write_issued(tmp_path, "cn-only", issue_leaf(pki.ca_issued, "server.test"))
    ctx = credentials.server_context(files.cert, files.key, pki.ca, False)
    return EngineEnd(HandshakeEngine(ctx, Role.SERVER))


def test_a_cn_only_server_certificate_does_not_match_by_default(pki: PKI,
                                                                tmp_path: Path) -> None:
    """RFC 9525 6.3 and RFC 9289 5.2: the name is in the subjectAltName; OpenSSL's own host
    check would fall back to the CN of a certificate without DNS names."""
    client = anon_client(pki, peername="server.test")
    run(client, _cn_only_server(pki, tmp_path))
    assert client.error.status == errno.EACCES
    assert "hostname mismatch" in str(client.error)


def test_cn_fallback_lets_a_legacy_cn_only_server_certificate_match(pki: PKI,
                                                                    tmp_path: Path) -> None:
    ctx = credentials.client_context(pki.ca)
    client = EngineEnd(HandshakeEngine(ctx, Role.CLIENT, peername="server.test",
                                       cn_fallback=True))
    run(client, _cn_only_server(pki, tmp_path))
    assert client.session.peer_certificate_der is not None
    wrong = EngineEnd(HandshakeEngine(ctx, Role.CLIENT, peername="other.test", cn_fallback=True))
    run(wrong, _cn_only_server(pki, tmp_path))
    assert wrong.error.status == errno.EACCES  # the CN still has to be the name


def test_hybrid_post_quantum_group_is_negotiated_by_default(pki: PKI) -> None:
    # OpenSSL >= 3.5 offers X25519MLKEM768 first by default; tlshd keeps the
    # library's default groups, so two engines should agree on it.
    client, server = anon_client(pki), engine_server(pki)
    run(client, server)
    group = client.session.group_name
    if group is None:
        pytest.skip("SSL_get0_group_name is not available in this OpenSSL binding")
    if SSL.OPENSSL_VERSION_NUMBER < 0x30500000:
        pytest.skip("OpenSSL < 3.5 does not offer X25519MLKEM768 by default")
    assert group == server.session.group_name == "X25519MLKEM768"


def client_hello_extensions(record: bytes) -> dict[int, bytes]:
    """Extension type -> body of the ClientHello in ``record`` (RFC 8446 4.1.2)."""
    body = record[5 + 4 :]  # record header, handshake header
    offset = 2 + 32  # legacy_version, random
    offset += 1 + body[offset]  # legacy_session_id
    offset += 2 + int.from_bytes(body[offset : offset + 2], "big")  # cipher_suites
    offset += 1 + body[offset]  # legacy_compression_methods
    end = offset + 2 + int.from_bytes(body[offset : offset + 2], "big")
    extensions, offset = {}, offset + 2
    while offset < end:
        kind, size = (int.from_bytes(body[offset + i : offset + i + 2], "big") for i in (0, 2))
        extensions[kind] = body[offset + 4 : offset + 4 + size]
        offset += 4 + size
    return extensions


SERVER_NAME, SUPPORTED_VERSIONS, PRE_SHARED_KEY, EARLY_DATA = 0, 43, 41, 42


@pytest.mark.parametrize(("peername", "sni"), [("server.test.", True), ("127.0.0.1", False)])
def test_client_hello_is_tls13_only_without_psk_or_early_data(
    pki: PKI, peername: str, sni: bool
) -> None:
    hello = anon_client(pki, peername=peername).engine.data_to_send()
    assert record_types(hello) == [HANDSHAKE]
    extensions = client_hello_extensions(hello)
    assert extensions[SUPPORTED_VERSIONS] == b"\x02\x03\x04"  # TLS 1.3 and nothing else
    assert PRE_SHARED_KEY not in extensions and EARLY_DATA not in extensions
    assert (SERVER_NAME in extensions) is sni  # RFC 6066: no SNI for IP literals
    if sni:
        assert extensions[SERVER_NAME].endswith(b"server.test")


def test_client_through_hello_retry_request(pki: PKI) -> None:
    # The server only accepts P-384, which the client supports but sent no
    # key share for: ServerHello becomes HelloRetryRequest, two server flights.
    ctx = plain_server_ctx(pki)
    ctx.set_tmp_ecdh(ec.SECP384R1())
    client, server = anon_client(pki, chunk=1), plain(ctx, Role.SERVER)
    run(client, server)
    assert client.session.group_name in ("secp384r1", None)
    assert client.session.tx_secret == server.keylog["CLIENT_TRAFFIC_SECRET_0"]
    assert client.session.rx_secret == server.keylog["SERVER_TRAFFIC_SECRET_0"]
    assert len(split_records(bytes(client.sent))) >= 4  # CH, CCS, CH2, Finished


def test_one_context_serves_interleaved_handshakes(pki: PKI) -> None:
    # The key-log callback is per context: each line must reach its own engine.
    server_ctx = credentials.server_context(pki.server.cert, pki.server.key, pki.ca, False)
    client_ctx = credentials.client_context(pki.ca)
    pairs = [
        (
            EngineEnd(HandshakeEngine(client_ctx, Role.CLIENT, peername="server.test")),
            EngineEnd(HandshakeEngine(server_ctx, Role.SERVER)),
        )
        for _ in range(3)
    ]
    for _ in range(20):  # one step of each pair in turn
        for client, server in pairs:
            out, _ = client.pump()
            server.inbox += out
            out, _ = server.pump()
            client.inbox += out
    secrets = set()
    for client, server in pairs:
        assert_matching_sessions(client.session, server.session)
        secrets.add(client.session.tx_secret)
    assert len(secrets) == 3


# -- no post-handshake records, no over-read ----------------------------------------------


def test_engine_server_sends_no_records_after_its_handshake_flight(pki: PKI) -> None:
    client = plain(plain_client_ctx(pki), Role.CLIENT)
    server = engine_server(pki)
    run(client, server)
    assert client.done and client.error is None
    # Everything the server engine ever wrote: ServerHello, CCS (middlebox
    # compatibility), then EncryptedExtensions..Finished under handshake keys.
    types = record_types(bytes(server.sent))
    assert types[:2] == [HANDSHAKE, CCS] and set(types[2:]) == {APPLICATION_DATA}
    assert server.completing_output == b""
    assert server.sent_after_done == b""
    assert server.session.dropped_post_handshake_records == 2  # OpenSSL's default two tickets
    # The plain client consumed everything and got nothing after the server's
    # Finished: no ticket, no alert.
    assert not client.inbox and not client.received
    assert client.post_handshake_error is None


def test_control_plain_openssl_server_does_send_two_tickets(pki: PKI) -> None:
    # Shows the test above would catch tickets: a plain server writes them.
    client = EngineEnd(anon_client(pki).engine)
    server = plain(plain_server_ctx(pki), Role.SERVER)
    run(client, server)
    assert server.done
    assert record_types(server.completing_output or b"") == [APPLICATION_DATA] * 2
    # The client engine stopped at the server's Finished: the tickets stay on
    # the wire for the kernel, nothing was read past the handshake.
    assert client.session.dropped_post_handshake_records == 0
    assert client.engine.trailing_data == b""
    assert bytes(client.inbox) == server.completing_output


def test_engine_server_tx_secret_protects_record_zero_for_the_peer(pki: PKI) -> None:
    client = plain(plain_client_ctx(pki), Role.CLIENT)
    server = engine_server(pki)
    run(client, server)
    session = server.session
    # kTLS starts at rec_seq 0: the withheld tickets used no sequence numbers
    # the peer knows of, so record 0 under tx_secret must decrypt at the peer.
    record = seal(session.cipher_name, session.tx_secret, 0, APPLICATION_DATA, b"from kTLS")
    client.conn.bio_write(record)
    assert client.conn.recv(100) == b"from kTLS"
    assert session.tx_secret == client.keylog["SERVER_TRAFFIC_SECRET_0"]
    assert session.rx_secret == client.keylog["CLIENT_TRAFFIC_SECRET_0"]


def test_client_final_flight_is_sent_and_nothing_after(pki: PKI) -> None:
    client = x509_client(pki)
    server = plain(plain_server_ctx(pki, verify_client=True), Role.SERVER)
    run(client, server)
    assert server.done and server.error is None
    # Certificate, CertificateVerify, Finished (after a CCS) go out in the
    # completing step; nothing follows.
    assert record_types(client.completing_output or b"")[0] == CCS
    assert set(record_types(client.completing_output or b"")[1:]) == {APPLICATION_DATA}
    assert client.sent_after_done == b""
    session = client.session
    record = seal(session.cipher_name, session.tx_secret, 0, APPLICATION_DATA, b"to server")
    server.conn.bio_write(record)
    assert server.conn.recv(100) == b"to server"


def test_server_app_data_behind_client_finished_stays_on_the_wire(pki: PKI) -> None:
    client = plain(plain_client_ctx(pki), Role.CLIENT, app_data=b"first RPC")
    server = engine_server(pki)
    run(client, server)
    finished_chunk = client.completing_output or b""
    app_record = split_records(finished_chunk)[-1]
    assert record_types(finished_chunk)[0] == CCS and finished_chunk.endswith(app_record)
    # An obedient caller read exactly up to the end of the client's Finished.
    assert bytes(server.inbox) == app_record
    assert server.engine.trailing_data == b""
    session = server.session
    assert unseal(session.cipher_name, session.rx_secret, 0, app_record) == (
        APPLICATION_DATA,
        b"first RPC",
    )


def test_greedy_caller_gets_the_excess_back_as_trailing_data(pki: PKI) -> None:
    client = plain(plain_client_ctx(pki), Role.CLIENT, app_data=b"first RPC")
    server = engine_server(pki, greedy=True)
    run(client, server)
    app_record = split_records(client.completing_output or b"")[-1]
    assert server.engine.trailing_data == app_record
    assert server.session.rx_seq == 0


def test_client_leaves_tickets_and_half_rtt_data_for_the_kernel(pki: PKI) -> None:
    client = anon_client(pki, greedy=False)
    server = plain(plain_server_ctx(pki), Role.SERVER, app_data=b"hello client")
    run(client, server)
    session = client.session
    left = split_records(bytes(client.inbox))
    assert len(left) == 3  # two NewSessionTickets, then the application data
    opened = [unseal(session.cipher_name, session.rx_secret, i, r) for i, r in enumerate(left)]
    assert [t for t, _ in opened] == [HANDSHAKE, HANDSHAKE, APPLICATION_DATA]
    assert opened[0][1][0] == 4  # HandshakeType new_session_ticket
    assert opened[2][1] == b"hello client"


def test_extra_bytes_after_server_finished_in_one_chunk(pki: PKI) -> None:
    # The server's whole flight plus a following record arrive in one read.
    client = anon_client(pki, greedy=True)
    server = plain(plain_server_ctx(pki), Role.SERVER)
    client.pump()
    server.inbox += client.sent
    flight, _ = server.pump()
    extra = bytes([APPLICATION_DATA, 3, 3, 0, 3]) + b"xyz"
    client.inbox += flight + extra
    client.pump()
    assert client.engine.trailing_data == extra
    assert isinstance(client.engine.next_event(), HandshakeComplete)


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 100])
def test_byte_at_a_time_and_small_reads(pki: PKI, chunk: int) -> None:
    client, server = anon_client(pki, chunk=chunk), engine_server(pki, chunk=chunk)
    run(client, server)
    assert_matching_sessions(client.session, server.session)
    assert client.engine.trailing_data == server.engine.trailing_data == b""


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(chunks=st.lists(st.integers(min_value=1, max_value=3000), min_size=1, max_size=40))
def test_any_read_pattern_never_over_reads(pki: PKI, chunks: list[int]) -> None:
    client = plain(plain_client_ctx(pki), Role.CLIENT, app_data=b"kernel data")
    server = engine_server(pki)
    sizes = itertools.cycle(chunks)
    # The caller reads min(NeedData, whatever the network delivered this time).
    while True:
        out, _ = client.pump()
        server.inbox += out
        event = server.engine.next_event()
        if not isinstance(event, NeedData):
            break
        assert 1 <= event.max_bytes <= 5 + 2**14 + 256
        take = min(event.max_bytes, next(sizes), len(server.inbox))
        if take:
            server.engine.receive_data(bytes(server.inbox[:take]))
            del server.inbox[:take]
        client.inbox += server.engine.data_to_send()
    assert bytes(server.inbox) == split_records(client.completing_output or b"")[-1]
    assert server.engine.trailing_data == b""
    assert server.engine.data_to_send() == b""


def test_need_data_asks_for_header_then_exactly_the_body(pki: PKI) -> None:
    client = anon_client(pki)
    hello = client.engine.data_to_send()
    server = HandshakeEngine(
        credentials.server_context(
            pki.server.cert, pki.server.key, None, False, request_client_cert=False
        ),
        Role.SERVER,
    )
    assert server.next_event() == NeedData(5)
    server.receive_data(hello[:2])
    assert server.next_event() == NeedData(3)
    server.receive_data(hello[2:5])
    assert server.next_event() == NeedData(len(hello) - 5)
    server.receive_data(hello[5:-1])
    assert server.next_event() == NeedData(1)
    server.receive_data(hello[-1:])
    assert server.next_event() == NeedData(5)
    assert record_types(server.data_to_send())[0] == HANDSHAKE


# -- failures ------------------------------------------------------------------------


def _alert_went_out(data: bytes) -> bool:
    """One record: a plaintext alert, or (after ServerHello) an encrypted one."""
    records = split_records(data)
    return len(records) == 1 and records[0][0] in (ALERT, APPLICATION_DATA)


@pytest.mark.parametrize(
    ("cert", "peername", "reason", "alert"),
    [
        ("untrusted_server", "server.test", "unable to get local issuer certificate", "unknown_ca"),
        ("expired_server", "server.test", "certificate has expired", "certificate_expired"),
        ("server", "other.test", "hostname mismatch", "bad_certificate"),
        ("server", "127.0.0.2", "ip address mismatch", "bad_certificate"),
        ("server", "::2", "ip address mismatch", "bad_certificate"),
    ],
    ids=["untrusted-ca", "expired", "wrong-dns-name", "wrong-ipv4", "wrong-ipv6"],
)
def test_client_rejects_bad_server_certificate(
    pki: PKI, cert: str, peername: str, reason: str, alert: str
) -> None:
    client, server = anon_client(pki, peername=peername), engine_server(pki, cert=cert)
    run(client, server)
    error = client.error
    assert type(error) is PeerAuthenticationError and error.status == errno.EACCES
    assert reason in str(error).lower()
    last_chunk = split_records(bytes(client.sent))[-1]
    assert _alert_went_out(last_chunk)
    # The server engine hears the alert and fails the same way.
    assert type(server.error) is PeerAuthenticationError
    assert str(server.error) == f"peer sent alert: {alert}"


def test_server_requires_client_certificate(pki: PKI) -> None:
    client, server = anon_client(pki), engine_server(pki, require=True)
    run(client, server)
    assert type(server.error) is PeerAuthenticationError
    assert "no certificate" in str(server.error)
    assert server.engine.data_to_send() == b""  # already taken by run()
    assert _alert_went_out(server.completing_output or split_records(bytes(server.sent))[-1])
    # TLS 1.3: the client's view is complete once it sent its Finished; the
    # certificate_required alert reaches kTLS (NFS: fatal alert -> EACCES).
    assert isinstance(client.engine.next_event(), HandshakeComplete)
    assert bytes(client.inbox) == split_records(bytes(server.sent))[-1]


def test_server_rejects_untrusted_client_certificate(pki: PKI) -> None:
    ctx = credentials.client_context(pki.ca, pki.untrusted_client.cert, pki.untrusted_client.key)
    client = EngineEnd(HandshakeEngine(ctx, Role.CLIENT, peername="server.test"))
    server = engine_server(pki, require=True)
    run(client, server)
    assert type(server.error) is PeerAuthenticationError
    assert "unable to get local issuer certificate" in str(server.error)
    assert _alert_went_out(split_records(bytes(server.sent))[-1])


def test_client_against_tls12_only_server(pki: PKI) -> None:
    client = anon_client(pki)
    server = plain(plain_server_ctx(pki, max_version=SSL.TLS1_2_VERSION), Role.SERVER)
    run(client, server)
    assert server.error is not None
    assert record_types(bytes(server.sent)) == [ALERT]
    assert type(client.error) is PeerProtocolError
    assert str(client.error) == "peer sent alert: protocol_version"


def test_server_against_tls12_only_client(pki: PKI) -> None:
    client = plain(plain_client_ctx(pki, max_version=SSL.TLS1_2_VERSION), Role.CLIENT)
    server = engine_server(pki)
    run(client, server)
    error = server.error
    assert type(error) is PeerProtocolError and error.status == errno.EACCES
    assert "unsupported protocol" in str(error)
    # protocol_version (70), fatal (2), in plaintext: the peer cannot decrypt yet.
    assert split_records(bytes(server.sent)) == [bytes([ALERT, 3, 3, 0, 2, 2, 70])]
    assert client.error is not None and "protocol version" in str(client.error)


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x00\x00\x00\x00\x00\x00",
        bytes([HANDSHAKE, 3, 3, 0xFF, 0xFF]),  # longer than 2^14+256
        bytes([HANDSHAKE, 2, 0, 0, 4]) + b"abcd",  # SSLv2-ish version
        bytes([24, 3, 3, 0, 1, 1]),  # heartbeat: not a TLS 1.3 content type
    ],
    ids=["http", "zeros", "oversized", "bad-version", "bad-type"],
)
@pytest.mark.parametrize("role", [Role.SERVER, Role.CLIENT])
def test_garbage_is_a_protocol_error(pki: PKI, garbage: bytes, role: Role) -> None:
    end = engine_server(pki) if role is Role.SERVER else anon_client(pki)
    end.engine.data_to_send()
    for i in range(len(garbage)):  # a byte at a time: fails at the header
        end.engine.receive_data(garbage[i : i + 1])
        if not isinstance(end.engine.next_event(), NeedData):
            break
    assert i == 4  # the header alone is enough
    error = end.error
    assert type(error) is PeerProtocolError
    assert "TLS record" in str(error)
    out = end.engine.data_to_send()
    assert out == b"" or record_types(out) == [ALERT]


def test_client_hears_handshake_failure_when_no_suite_is_shared(pki: PKI) -> None:
    client = anon_client(pki, ciphersuites="TLS_AES_128_CCM_SHA256")
    server = plain(plain_server_ctx(pki), Role.SERVER)  # CCM is off by default
    run(client, server)
    assert type(client.error) is PeerAuthenticationError
    assert str(client.error) == "peer sent alert: handshake_failure"


def test_server_with_no_shared_suite_sends_handshake_failure(pki: PKI) -> None:
    client = anon_client(pki, ciphersuites="TLS_AES_128_GCM_SHA256")
    server = engine_server(pki, ciphersuites="TLS_CHACHA20_POLY1305_SHA256")
    run(client, server)
    assert type(server.error) is PeerProtocolError
    assert "no shared cipher" in str(server.error)
    assert split_records(bytes(server.sent)) == [bytes([ALERT, 3, 3, 0, 2, 2, 40])]
    assert str(client.error) == "peer sent alert: handshake_failure"


def test_close_notify_mid_handshake_is_peer_closed(pki: PKI) -> None:
    client = anon_client(pki)
    client.engine.data_to_send()
    client.engine.receive_data(bytes([ALERT, 3, 3, 0, 2, 1, 0]))  # close_notify after ClientHello
    assert type(client.error) is PeerClosedError
    assert "close_notify" in str(client.error)
    assert client.engine.data_to_send() == b""


def test_garbage_record_body_is_a_protocol_error(pki: PKI) -> None:
    server = engine_server(pki)
    # A ClientHello of length 0 inside a well-formed record.
    server.engine.receive_data(bytes([HANDSHAKE, 3, 1, 0, 4]) + b"\x01\x00\x00\x00")
    assert type(server.error) is PeerProtocolError
    assert record_types(server.engine.data_to_send()) == [ALERT]


@pytest.mark.parametrize("partial", [0, 3, 10])
def test_peer_closes_mid_handshake(pki: PKI, partial: int) -> None:
    client = anon_client(pki)
    hello = client.engine.data_to_send()
    server = engine_server(pki)
    server.engine.receive_data(hello[:partial])
    server.engine.receive_data(b"")
    assert type(server.error) is PeerClosedError
    assert server.engine.data_to_send() == b""
    client.engine.receive_data(b"")
    assert type(client.error) is PeerClosedError
    assert str(client.error) == "peer closed the connection during the handshake"


def test_events_after_the_end_are_stable(pki: PKI) -> None:
    client, server = anon_client(pki), engine_server(pki)
    run(client, server)
    first = client.engine.next_event()
    client.engine.receive_data(b"")  # close after completion: nothing changes
    assert client.engine.next_event() is first
    client.engine.receive_data(b"late")
    assert client.engine.trailing_data == b"late"


def test_bad_peername_is_refused(pki: PKI) -> None:
    ctx = credentials.client_context(pki.ca)
    for bad in ("", "bad name", "caf\u00e9.test", "a" * 60_000, "x" * 300 + ".test",
                "a..test", "a" * 64 + ".test", "a.b\0c"):
        with pytest.raises(UnsupportedRequestError) as caught:
            HandshakeEngine(ctx, Role.CLIENT, peername=bad)
        assert caught.value.status == errno.EINVAL  # the kernel side's mistake, not EIO
        assert len(str(caught.value)) < 200


def test_the_longest_usable_peername_is_accepted(pki: PKI) -> None:
    name = ".".join(["a" * 63] * 3 + ["b" * 61])  # 253 characters
    HandshakeEngine(credentials.client_context(pki.ca), Role.CLIENT, peername=name)


def test_context_without_keylog_callback_is_refused() -> None:
    with pytest.raises(ValueError, match="key-log"):
        HandshakeEngine(SSL.Context(SSL.TLS_METHOD), Role.SERVER)


# -- no secrets in repr ----------------------------------------------------------------


def _assert_hidden(text: str, secret: bytes) -> None:
    assert secret.hex() not in text.lower()
    assert secret.hex().upper() not in text
    assert repr(secret) not in text
    assert secret.decode("latin-1") not in text


def test_session_repr_hides_secrets(pki: PKI) -> None:
    client, server = anon_client(pki), engine_server(pki)
    run(client, server)
    session = client.session
    event = client.engine.next_event()
    for text in (repr(session), str(session), repr(event), str(event)):
        _assert_hidden(text, session.tx_secret)
        _assert_hidden(text, session.rx_secret)
        assert "TLS_AES" in text or "TLS_CHACHA" in text


def test_count_records() -> None:
    assert count_records(b"") == 0
    assert count_records(bytes([23, 3, 3, 0, 1, 0]) * 3) == 3


def test_repr_with_synthetic_secret() -> None:
    secret = bytes(range(32))
    session = SessionResult("TLS_AES_128_GCM_SHA256", "TLSv1.3", secret, secret[::-1])
    _assert_hidden(repr(HandshakeComplete(session)), secret)
    _assert_hidden(repr(HandshakeComplete(session)), secret[::-1])


def test_sslkeylogfile_gets_the_nss_key_log_lines_of_both_sides(
    pki: PKI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SSLKEYLOGFILE, as GnuTLS honours it for ktls-utils: a capture can be decrypted."""
    from tlshd.keylog import KeyLogFile

    path = tmp_path / "keys.log"
    keylog = KeyLogFile({"SSLKEYLOGFILE": str(path)})
    client = EngineEnd(HandshakeEngine(credentials.client_context(pki.ca), Role.CLIENT,
                                       peername="server.test", keylog=keylog.write))
    server = EngineEnd(HandshakeEngine(credentials.server_context(
        pki.server.cert, pki.server.key, pki.ca, False), Role.SERVER, keylog=keylog.write))
    run(client, server)
    lines = path.read_bytes().splitlines()
    labels = sorted({line.split(b" ")[0] for line in lines})
    assert labels == [b"CLIENT_HANDSHAKE_TRAFFIC_SECRET", b"CLIENT_TRAFFIC_SECRET_0",
                      b"EXPORTER_SECRET", b"SERVER_HANDSHAKE_TRAFFIC_SECRET",
                      b"SERVER_TRAFFIC_SECRET_0"]
    assert len(lines) == 10  # five per side, the same client random on each
    assert len({line.split(b" ")[1] for line in lines}) == 1
    assert path.stat().st_mode & 0o777 == 0o600


def test_without_sslkeylogfile_nothing_is_written() -> None:
    from tlshd.keylog import KeyLogFile

    keylog = KeyLogFile({})
    keylog.write(b"CLIENT_TRAFFIC_SECRET_0 00 11")
    assert keylog.path is None
