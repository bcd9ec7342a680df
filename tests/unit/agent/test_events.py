"""tlshd.agent.events: the worker-to-supervisor events, their one schema."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tlshd.agent.events import Done, Fatal, Limit, Ready, Start, decode, encode
from tlshd.errors import DecodeError

DONE = Done(role="client", auth="x509", peer="server.test", cipher="TLS_AES_128_GCM_SHA256",
            status=0, ms=12.5, what="ok", netns="net:[1]", tls_ms=1.25, pid=42)


@pytest.mark.parametrize("event", [Ready(pid=1), Start(pid=2), DONE, Limit("per_peer", pid=3),
                                   Fatal("ACCEPT: EPERM (1)", pid=4)])
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
