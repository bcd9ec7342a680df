"""Fuzz targets for the parsers that see untrusted input and had none: the configuration
reader, the ClientHello collector, the engine's record layer as a server, and the log
escaper. Each runs briefly in CI (Hypothesis's default 100 examples) and long under
scripts/fuzz (HYPOTHESIS_PROFILE=nightly). The codec, key-log and GLib targets live beside
their tests (test_codec.py, test_secrets.py, test_config_glib.py)."""

from __future__ import annotations

import contextlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.pki import PKI
from tlshd.config import parse_config
from tlshd.credentials import builders as credentials
from tlshd.errors import ConfigError, DecodeError
from tlshd.handshake.engine import HandshakeEngine, Role
from tlshd.handshake.events import HandshakeComplete, HandshakeFailed, NeedData
from tlshd.handshake.hello import HelloCollector
from tlshd.untrusted import LIMIT, show, show_all

CONFIG_TEXT = st.text(alphabet=st.sampled_from(
    [*"[]=#;\\ \t\n.abcdefgiklmnorstuvwxyz0123456789-_/", "\u00e9", "\0"]), max_size=400)
KEYS = st.sampled_from(["loglevel", "tls", "nl", "delay_done", "keyrings", "x509.truststore",
                        "x509.certificate", "x509.private_key", "workers", "max_inflight",
                        "upcall", "cn_fallback", "metrics", "first_flight_timeout_ms"])
GROUPS = st.sampled_from(["debug", "authenticate", "authenticate.client",
                          "authenticate.server", "agent", "x"])


@given(CONFIG_TEXT)
def test_any_text_is_a_config_or_a_config_error(text: str) -> None:
    with contextlib.suppress(ConfigError):
        parse_config(text)


@given(st.lists(st.tuples(GROUPS, KEYS, st.text(max_size=40)), max_size=12))
def test_any_known_key_with_any_value_loads_or_says_which_line(entries: list) -> None:
    text = "".join(f"[{g}]\n{k}={v.replace(chr(10), ' ')}\n" for g, k, v in entries)
    try:
        parse_config(text)
    except ConfigError as exc:
        assert exc.where


RECORDS = st.lists(st.tuples(st.sampled_from([22, 22, 22, 23, 21, 20, 0]),
                             st.binary(max_size=300)), max_size=20)


@given(RECORDS)
def test_the_hello_collector_holds_at_most_its_limit_and_raises_only_decode_error(
    records: list[tuple[int, bytes]]
) -> None:
    collector = HelloCollector(limit=1024)
    for content_type, body in records:
        try:
            hello = collector.feed(bytes([content_type, 3, 3]) + len(body).to_bytes(2, "big")
                                   + body)
        except DecodeError:
            return
        assert len(collector._payload) <= 1024 + 300 or hello is not None
        if hello is not None:
            assert hello[0] == 1 and len(hello) <= 1024
            return


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(st.lists(st.binary(max_size=600), max_size=8), st.booleans())
def test_a_server_engine_fed_anything_has_an_event_and_never_raises(
    pki: PKI, chunks: list[bytes], awaiting: bool
) -> None:
    ctx = credentials.server_context(pki.server.cert, pki.server.key, pki.ca, False)
    engine = HandshakeEngine(ctx, Role.SERVER, await_credentials=awaiting)
    for chunk in [b"\x16\x03\x01" + c for c in chunks]:
        engine.receive_data(chunk)
        event = engine.next_event()
        assert not isinstance(event, HandshakeComplete)  # garbage never completes
        if isinstance(event, HandshakeFailed):
            assert event.error.status > 0
            return
        if not isinstance(event, NeedData):  # it asks for credentials: refuse, as a worker may
            from tlshd.errors import UnknownPSKIdentityError

            engine.refuse(UnknownPSKIdentityError("fuzz"))
            assert isinstance(engine.next_event(), HandshakeFailed)
            return
    assert isinstance(engine.data_to_send(), bytes)


@given(st.one_of(st.binary(max_size=2000), st.text(max_size=2000)))
def test_shown_untrusted_data_is_one_bounded_line(data: bytes | str) -> None:
    shown = show(data)
    assert "\n" not in shown and "\r" not in shown
    assert len(shown) <= 4 * LIMIT + 40  # repr escapes at most 4 characters a byte


@given(st.lists(st.binary(max_size=200), max_size=50))
def test_shown_lists_are_bounded(items: list[bytes]) -> None:
    assert len(show_all(items)) <= 4 * (4 * LIMIT + 40) + 30
