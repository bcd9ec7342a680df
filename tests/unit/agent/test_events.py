"""tlshd.agent.events: the worker-to-supervisor events, their one schema."""

from __future__ import annotations

import contextlib
import dataclasses
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tlshd.agent.events import (
    MAX_EVENT,
    App,
    Done,
    EventBatch,
    Fatal,
    Limit,
    Ready,
    Start,
    decode,
    decode_all,
    encode,
    encode_all,
)
from tlshd.errors import DecodeError

DONE = Done(role="client", auth="x509", peer="server.test", cipher="TLS_AES_128_GCM_SHA256",
            status=0, ms=12.5, what="ok", netns="net:[1]", tls_ms=1.25, pid=42)


APP = App(role="client", rule="web", app_pid=77, executable="/usr/bin/curl",
          peer="CN=server.test", cipher="TLS_AES_256_GCM_SHA384", status=0, pid=5)


@pytest.mark.parametrize("event", [Ready(pid=1), Start(pid=2), DONE, Limit("per_peer", pid=3),
                                   Fatal("ACCEPT: EPERM (1)", pid=4), APP])
def test_every_kind_round_trips(event: object) -> None:
    assert decode(encode(event)) == event  # type: ignore[arg-type]


def test_a_long_outcome_is_cut_on_the_wire() -> None:
    long = Done(**{**DONE.__dict__, "what": "x" * 5000})
    assert len(decode(encode(long)).what) == 300  # type: ignore[union-attr]


@pytest.mark.parametrize("raw", [
    {"t": "gone", "pid": 1},
    {"t": "done", "pid": 1},  # fields missing
    {**json.loads(encode(DONE)), "status": "0"},  # mistyped
    {**json.loads(encode(DONE)), "status": True},  # a bool is not a status
    {**json.loads(encode(DONE)), "extra": 1},  # unknown field
    {"t": "limit", "pid": 1},  # no limit named
    [1, 2],
])
def test_anything_else_is_refused(raw: object) -> None:
    with pytest.raises(DecodeError):
        decode(json.dumps(raw).encode())


@given(st.binary(max_size=300))
def test_arbitrary_bytes_decode_or_raise_decode_error_only(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode(data)


def test_deep_nesting_is_a_decode_error_not_a_recursion_error() -> None:
    with pytest.raises(DecodeError):
        decode(b"[" * 4096)


# --- batches (issue 16: one datagram per loop turn, not per event) ----------------------


def test_a_batch_round_trips_in_order_with_the_senders_pid() -> None:
    events = [Start(), DONE, Limit("first_flight"), Start(), DONE]
    (datagram,) = encode_all(events, pid=7)
    assert decode_all(datagram) == [dataclasses.replace(e, pid=7) for e in events]


def test_a_single_event_datagram_still_decodes() -> None:
    assert decode_all(encode(DONE)) == [DONE]


def test_batches_split_at_max_event_and_lose_nothing() -> None:
    events = [dataclasses.replace(DONE, what="\x01" * 300, ms=float(i)) for i in range(40)]
    datagrams = encode_all(events, pid=1)
    assert len(datagrams) > 1
    assert all(len(d) <= MAX_EVENT for d in datagrams)
    got = [event for d in datagrams for event in decode_all(d)]
    assert [e.ms for e in got] == [float(i) for i in range(40)]  # type: ignore[union-attr]


def test_a_batch_with_one_bad_event_is_refused_whole() -> None:
    good = json.loads(encode(DONE))
    with pytest.raises(DecodeError):
        decode_all(json.dumps([good, {**good, "status": "0"}]).encode())


def test_event_batch_waits_for_flush_but_sends_ready_and_fatal_at_once() -> None:
    sent: list[bytes] = []
    batch = EventBatch(sent.append, pid=9)
    batch(Start())
    batch(DONE)
    assert sent == []
    batch.flush()
    assert [decode_all(d) for d in sent] == [[Start(pid=9), dataclasses.replace(DONE, pid=9)]]
    batch.flush()
    assert len(sent) == 1  # nothing new: nothing sent
    batch(Ready())
    assert decode_all(sent[-1]) == [Ready(pid=9)]
    batch(Fatal("no endpoint"))
    assert decode_all(sent[-1]) == [Fatal("no endpoint", pid=9)]


def test_a_dones_session_tags_round_trip_and_are_bounded() -> None:
    tagged = Done(**{**DONE.__dict__, "tags": ("staff", "not-self-signed")})
    assert decode(encode(tagged)) == tagged
    many = Done(**{**DONE.__dict__, "tags": tuple("t" * 200 + str(i) for i in range(64))})
    decoded = decode(encode(many))
    assert isinstance(decoded, Done) and 0 < len(decoded.tags) < 64  # whole tags, one datagram
    assert all(t in many.tags for t in decoded.tags)


@pytest.mark.parametrize("tags", ["staff", [1], ["x" * 256]])
def test_mistyped_session_tags_are_refused(tags: object) -> None:
    raw = json.loads(encode(DONE))
    raw["tags"] = tags
    with pytest.raises(DecodeError):
        decode(json.dumps(raw).encode())
