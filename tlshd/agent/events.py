"""What a worker tells its supervisor, as types: one datagram each, JSON on the wire.

Five kinds, each a frozen dataclass with the worker's ``pid`` (filled in by the sender):

- ``Ready``: the worker has its upcall open and listens;
- ``Start``: a request was accepted;
- ``Done``: a request ended (role, auth mode, peer name, cipher, DONE status, duration, what
  happened, namespace, time inside OpenSSL);
- ``Limit``: a per-peer limit ended or refused a handshake (``first_flight``, ``max_waiting``,
  ``per_peer``);
- ``Fatal``: the worker cannot serve, and why (its last word before it exits).

``encode`` and ``decode`` are the schema, in one place: ``decode`` refuses (DecodeError)
anything that is not exactly one of these, so a confused worker cannot corrupt the
statistics. No event carries key material: names, numbers and error descriptions only.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tlshd.errors import DecodeError

MAX_EVENT = 4096


@dataclass(frozen=True)
class Ready:
    pid: int = 0


@dataclass(frozen=True)
class Start:
    pid: int = 0


@dataclass(frozen=True)
class Done:
    role: str
    auth: str
    peer: str
    cipher: str
    status: int
    ms: float
    what: str
    netns: str
    tls_ms: float = 0.0
    pid: int = 0


@dataclass(frozen=True)
class Limit:
    limit: str
    pid: int = 0


@dataclass(frozen=True)
class Fatal:
    reason: str
    pid: int = 0


WorkerEvent = Ready | Start | Done | Limit | Fatal
EventSink = Callable[[WorkerEvent], None]
_KINDS: dict[str, type[WorkerEvent]] = {"ready": Ready, "start": Start, "done": Done,
                                        "limit": Limit, "fatal": Fatal}
_NAMES = {cls: name for name, cls in _KINDS.items()}
_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,)}


def encode(event: WorkerEvent) -> bytes:
    fields = dataclasses.asdict(event)
    if isinstance(event, Done):
        fields["what"] = event.what[:300]
    data = json.dumps({"t": _NAMES[type(event)], **fields}, separators=(",", ":")).encode()
    return data[:MAX_EVENT]


def decode(data: bytes) -> WorkerEvent:
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise DecodeError("worker event is not JSON") from None
    if not isinstance(raw, dict) or raw.get("t") not in _KINDS:
        raise DecodeError("worker event without a known type")
    cls = _KINDS[raw.pop("t")]
    return cls(**_checked(cls, raw))


def _checked(cls: type[WorkerEvent], raw: dict[str, Any]) -> dict[str, Any]:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if set(raw) - set(fields):
        raise DecodeError(f"worker event {cls.__name__} with unknown fields")
    for name, spec in fields.items():
        if name not in raw:
            if spec.default is dataclasses.MISSING:
                raise DecodeError(f"worker event field {name!r} missing")
            continue
        value = raw[name]
        if isinstance(value, bool) or not isinstance(value, _TYPES[str(spec.type)]):
            raise DecodeError(f"worker event field {name!r} mistyped")
    return raw
