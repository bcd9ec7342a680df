"""What a worker tells its supervisor, as types: JSON on the wire.

Six kinds, each a frozen dataclass with the worker's ``pid`` (filled in by the sender):

- ``Ready``: the worker has its upcall open and listens;
- ``Start``: a request was accepted;
- ``Done``: a request ended (role, auth mode, peer name, cipher, DONE status, duration, what
  happened, namespace, time inside OpenSSL);
- ``App``: an application's request ended (role, policy rule, the process and its
  executable, the verified peer, cipher, status);
- ``Limit``: a per-peer limit ended or refused a handshake (``first_flight``, ``max_waiting``,
  ``per_peer``);
- ``Fatal``: the worker cannot serve, and why (its last word before it exits).

``encode`` and ``decode`` are the schema, in one place: ``decode`` refuses (DecodeError)
anything that is not exactly one of these, so a confused worker cannot corrupt the
statistics. No event carries key material: names, numbers and error descriptions only.

A worker does not send a datagram per event: ``EventBatch`` keeps a loop turn's events
and sends them at ``flush`` as JSON arrays of at most ``MAX_EVENT`` bytes (``decode_all``
reads either form). ``Ready`` and ``Fatal`` go at once: the supervisor waits for them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
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
    tls_ms: float = 0.0  # CPU inside OpenSSL
    cpu_ms: float = 0.0  # CPU of the whole request, ACCEPT reply to DONE (0: not measured)
    pid: int = 0
    tags: tuple[str, ...] = ()  # the session tags the peer's certificate got (tlshd.tags)


@dataclass(frozen=True)
class App:
    """An application's request ended (tlshd.app, tlshd wrap): the AT-TLS view of it."""

    role: str
    rule: str  # the policy rule that allowed it ("" under allow_users)
    app_pid: int  # the process the socket is for
    executable: str
    peer: str  # the verified peer certificate's subject
    cipher: str
    status: int
    pid: int = 0


@dataclass(frozen=True)
class Limit:
    limit: str
    pid: int = 0


@dataclass(frozen=True)
class Fatal:
    reason: str
    pid: int = 0


WorkerEvent = Ready | Start | Done | App | Limit | Fatal
EventSink = Callable[[WorkerEvent], None]
_KINDS: dict[str, type[WorkerEvent]] = {"ready": Ready, "start": Start, "done": Done,
                                        "app": App, "limit": Limit, "fatal": Fatal}
_NAMES = {cls: name for name, cls in _KINDS.items()}
MAX_LIST, MAX_LIST_ITEM = 64, 255  # a Done's session tags
_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,)}


_FIELDS = {cls: tuple(f.name for f in dataclasses.fields(cls)) for cls in _KINDS.values()}
_JSON = json.JSONEncoder(separators=(",", ":"))


def _text(event: WorkerEvent, pid: int | None = None) -> str:
    """One event as a JSON object (no deep copy: every field is a str or a number)."""
    fields: dict[str, Any] = {"t": _NAMES[type(event)]}
    for name in _FIELDS[type(event)]:
        fields[name] = getattr(event, name)
    if pid is not None:
        fields["pid"] = pid
    if isinstance(event, Done):
        fields["what"] = event.what[:300]
        fields["tags"] = _bounded_tags(event.tags)
    return _JSON.encode(fields)


def encode(event: WorkerEvent) -> bytes:
    return _text(event).encode()[:MAX_EVENT]


def encode_all(events: Sequence[WorkerEvent], pid: int) -> list[bytes]:
    """``events`` as few datagrams as ``MAX_EVENT`` allows: JSON arrays, in order. An event
    longer than that on its own is cut, as ``encode`` cuts it (and then fails to decode)."""
    datagrams: list[bytes] = []
    batch: list[bytes] = []
    size = 2
    for event in events:
        item = _text(event, pid).encode()[:MAX_EVENT - 2]
        if batch and size + len(item) + 1 > MAX_EVENT:
            datagrams.append(b"[" + b",".join(batch) + b"]")
            batch, size = [], 2
        batch.append(item)
        size += len(item) + 1
    if batch:
        datagrams.append(b"[" + b",".join(batch) + b"]")
    return datagrams


class EventBatch:
    """The event sink of a worker: events wait for ``flush`` (once per loop turn), then
    go as ``encode_all`` datagrams through ``send``; ``Ready`` and ``Fatal`` go at once."""

    def __init__(self, send: Callable[[bytes], None], pid: int) -> None:
        self._send, self._pid = send, pid
        self._pending: list[WorkerEvent] = []

    def __call__(self, event: WorkerEvent) -> None:
        self._pending.append(event)
        if isinstance(event, Ready | Fatal):
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        for datagram in encode_all(pending, self._pid):
            self._send(datagram)


def decode(data: bytes) -> WorkerEvent:
    return _event(_json(data))


def decode_all(data: bytes) -> list[WorkerEvent]:
    """One datagram: an event, or an array of them (all well formed, or DecodeError)."""
    raw = _json(data)
    if isinstance(raw, list):
        if len(raw) > MAX_EVENT // 8:
            raise DecodeError("worker event batch too long")
        return [_event(item) for item in raw]
    return [_event(raw)]


def _json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise DecodeError("worker event is not JSON") from None


def _event(raw: Any) -> WorkerEvent:
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
        if str(spec.type) == "tuple[str, ...]":
            raw[name] = _strings(name, value)
            continue
        if isinstance(value, bool) or not isinstance(value, _TYPES[str(spec.type)]):
            raise DecodeError(f"worker event field {name!r} mistyped")
    return raw


def _strings(name: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > MAX_LIST or not all(
            isinstance(v, str) and len(v) <= MAX_LIST_ITEM for v in value):
        raise DecodeError(f"worker event field {name!r} mistyped")
    return tuple(value)


def _bounded_tags(tags: tuple[str, ...], budget: int = 2048) -> list[str]:
    """As many whole tags as fit ``budget`` characters: a Done event stays one datagram."""
    kept: list[str] = []
    for tag in tags[:MAX_LIST]:
        budget -= len(tag) + 3
        if budget < 0:
            break
        kept.append(tag[:MAX_LIST_ITEM])
    return kept
