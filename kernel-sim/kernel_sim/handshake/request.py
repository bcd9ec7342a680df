"""Handshake request lifetime, after ``net/handshake/request.c``.

Theory of operation
-------------------
Each network namespace has a ``HandshakeNet``: a FIFO of pending requests,
a pending count and its cap (``hn_pending_max``: totalram / (25 * mem_unit)
pages clamped to 3..50, see ``handshake_net_init`` in net/handshake/netlink.c).
A global table maps each socket to its request (the kernel's rhashtable keyed
by ``struct sock *``; here keyed by the socket cookie, which is as unique).

* ``submit``: EOPNOTSUPP (namespace draining), EAGAIN (over the cap), EBUSY
  (the socket already has a request: the entry stays until the socket is
  destroyed, so even a *completed* request blocks a second submit), then
  queue, then notify; a failed notify (ESRCH: nobody in the namespace listens
  on the handler-class group) unqueues and fails the submit.
* ``next``: the oldest pending request of the class (FIFO), unqueued.
* ``complete``: exactly once (HANDSHAKE_F_REQ_COMPLETED); the proto's done
  hook runs the consumer's callback.
* ``cancel``: a pending request is unqueued (the agent never sees it); an
  accepted one is marked completed without calling the consumer; returns
  whether the cancel won the race.
* ``destruct``: the socket went away; the table entry is dropped.
* ``net_exit``: pending requests complete with -ETIMEDOUT. (Linux before the
  2026 "handshake-file-pin" fix spliced the lists the wrong way round and
  completed none; ``KernelProfile.net_exit_completes_pending`` selects.)

All state is guarded by one lock: the agent's ACCEPT/DONE arrive on the
simulator's event-loop thread, consumers submit and cancel from theirs.
"""

from __future__ import annotations

import errno
import os
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

HANDLER_CLASS_NONE = 0
HANDLER_CLASS_TLSHD = 1
HANDLER_CLASS_MAX = 2


def default_pending_max() -> int:
    """``clamp(totalram / (25 * mem_unit), 3, 50)``: totalram counted in pages."""
    pages = os.sysconf("SC_PHYS_PAGES")
    return max(3, min(50, pages // 25))


class HandshakeProto(Protocol):
    handler_class: int

    def done(self, req: HandshakeReq, status: int, remote_auth: tuple[int, ...] | None) -> None:
        """``hp_done``: status is the negative errno the consumer sees (or 0)."""


@dataclass(eq=False)
class HandshakeReq:
    """One request; ``sock_key`` identifies the consumer's socket (its cookie)."""

    proto: HandshakeProto
    sock_key: int
    sock: Any
    net: HandshakeNet | None = None
    completed: bool = False
    pending: bool = False
    accepted: bool = False
    priv: Any = None
    session_tags: tuple[str, ...] = ()  # DONE's tags (the posted session-tags series)


@dataclass(eq=False)
class HandshakeNet:
    """``struct handshake_net`` for one namespace."""

    name: str
    pending_max: int = field(default_factory=default_pending_max)
    requests: deque[HandshakeReq] = field(default_factory=deque)
    draining: bool = False


class SubmitError(Exception):
    def __init__(self, err: int) -> None:
        super().__init__(errno.errorcode.get(-err, str(err)))
        self.errno = err


Notifier = Callable[[HandshakeNet, int], int]  # (net, handler class) -> 0 or -errno
Tracer = Callable[[str, HandshakeReq | None, dict[str, Any]], None]


class RequestTable:
    """The global socket -> request table plus every namespace's pending list."""

    def __init__(self, notify: Notifier, trace: Tracer | None = None) -> None:
        self.lock = threading.RLock()
        self._by_sock: dict[int, HandshakeReq] = {}
        self._notify = notify
        self._trace: Tracer = trace or (lambda event, req, info: None)

    def lookup(self, sock_key: int) -> HandshakeReq | None:
        with self.lock:
            return self._by_sock.get(sock_key)

    def submit(self, net: HandshakeNet | None, req: HandshakeReq) -> None:
        """``handshake_req_submit``; raises SubmitError(-errno) and keeps nothing."""
        with self.lock:
            err = self._enqueue(net, req)
            if err == 0:
                assert net is not None
                err = self._notify(net, req.proto.handler_class)
                if err:
                    self._trace("notify_err", req, {"errno": err})
                if err and not self._remove_pending(req):
                    err = 0  # an agent accepted it already: the submit stands
            if err:
                self._trace("submit_err", req, {"errno": err})
                self._destroy(req)
                raise SubmitError(err)
            self._trace("submit", req, {})

    def _enqueue(self, net: HandshakeNet | None, req: HandshakeReq) -> int:
        if net is None or net.draining:
            return -errno.EOPNOTSUPP
        if len(net.requests) >= net.pending_max:
            return -errno.EAGAIN
        if req.sock_key in self._by_sock:
            return -errno.EBUSY
        self._by_sock[req.sock_key] = req
        req.net, req.pending = net, True
        net.requests.append(req)
        return 0

    def _remove_pending(self, req: HandshakeReq) -> bool:
        if not req.pending or req.net is None:
            return False
        req.net.requests.remove(req)
        req.pending = False
        return True

    def _destroy(self, req: HandshakeReq) -> None:
        if self._by_sock.get(req.sock_key) is req:
            del self._by_sock[req.sock_key]

    def next(self, net: HandshakeNet, handler_class: int) -> HandshakeReq | None:
        """``handshake_req_next``: the oldest pending request of that class."""
        with self.lock:
            for req in net.requests:
                if req.proto.handler_class == handler_class:
                    net.requests.remove(req)
                    req.pending, req.accepted = False, True
                    return req
            return None

    def complete(
        self, req: HandshakeReq, status: int, remote_auth: tuple[int, ...] | None
    ) -> bool:
        """``handshake_complete``: status is what the consumer sees; once only."""
        with self.lock:
            if req.completed:
                return False
            req.completed = True
            self._trace("complete", req, {"status": status})
        req.proto.done(req, status, remote_auth)
        return True

    def cancel(self, sock_key: int) -> bool:
        """``handshake_req_cancel``: True if the cancel won against completion."""
        with self.lock:
            req = self._by_sock.get(sock_key)
            if req is None:
                self._trace("cancel_none", None, {"sock": sock_key})
                return False
            if not self._remove_pending(req):
                if req.completed:
                    self._trace("cancel_busy", req, {})
                    return False
                req.completed = True
            self._trace("cancel", req, {})
            return True

    def destruct(self, sock_key: int) -> None:
        """``handshake_sk_destruct``: the consumer's socket is gone."""
        with self.lock:
            req = self._by_sock.pop(sock_key, None)
            if req is not None:
                self._remove_pending(req)
                self._trace("destruct", req, {})

    def net_exit(self, net: HandshakeNet, status: int, *, complete_pending: bool = True) -> None:
        """``handshake_net_exit``: drain; pending requests complete with ``status`` (ETIMEDOUT)."""
        with self.lock:
            net.draining = True
            drained = list(net.requests) if complete_pending else []
            for req in drained:
                self._remove_pending(req)
        for req in drained:
            self.complete(req, status, None)
