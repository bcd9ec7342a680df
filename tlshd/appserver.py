"""The application request endpoint (``[app] enabled``): TLS for a process's own socket.

An application (:mod:`tlshd.app`) sends one datagram to the abstract Unix name ``[app]
socket`` of its network namespace: a JSON request ``{"v": 1, "role": "client"|"server",
"server_name": NAME|null, "timeout_ms": N, "for_pid": PID}`` and its connected TCP socket as
SCM_RIGHTS. The kernel adds the sender's pid, uid and gid (SCM_CREDENTIALS: the socket has
SO_PASSCRED), so the caller cannot lie about who it is. ``for_pid`` (optional; ``tlshd
wrap`` sends it) names the process the socket is for; it must run as the sender's uid (real
and effective), and policy then judges its executable and cgroup. Within one uid this is
no boundary: a process may act for another of its uid, which it could ptrace anyway. The
answer is one datagram back to the sender's address: ``{"v": 1, "status": ERRNO, "error":
TEXT, "peer": SUBJECT, "cipher": SUITE}``.

An allowed request becomes an ``AcceptReply`` like the kernel's, and the worker runs it as
it runs the kernel's requests, with the same credentials, checks and kTLS installation: this
class is an ``Upcall`` (accept, done, setsockopt), and :class:`CombinedUpcall` puts it beside
the kernel's upcall in a worker. A request that is not allowed, or not well formed, is
answered at once (EACCES, EINVAL, ENOTSOCK, ENOTCONN) and never reaches a handshake.

With privilege separation the endpoint lives in the monitor, with the upcall: the uid is
judged there, and the confined handshake process sees only the requests that passed.
"""

from __future__ import annotations

import array
import base64
import contextlib
import errno
import json
import logging
import os
import select
import socket
import struct
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from tlshd.agent.events import App
from tlshd.errors import TransportError
from tlshd.ktls import KernelSockopt
from tlshd.netlink.messages import AcceptReply, Header
from tlshd.netlink.spec import AuthMode, MsgType
from tlshd.policy import Policy, facts_of, process_ids
from tlshd.untrusted import show

log = logging.getLogger("tlshd")

MAX_REQUEST = 4096
MAX_ANSWER = 64 * 1024  # room for one record of data read before the hand-over
MAX_NAME = 253  # a DNS name
MAX_TIMEOUT_MS = 600_000
_UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid
_MAX_FDS = 4  # more than one fd is refused; room to see (and close) a few


APP_REQUEST = 0  # the header type of an application's request (the kernel's: its family id)


def is_app_request(reply: AcceptReply) -> bool:
    """The request came from an application (its header's pid is the caller's)."""
    return reply.header.type == APP_REQUEST


class SockoptTarget(Protocol):
    def setsockopt(self, fd: int, level: int, optname: int, value: bytes) -> None: ...

    def setsockopts(self, fd: int, steps: Sequence[tuple[int, int, bytes]]) -> None: ...


@dataclass(frozen=True)
class Caller:
    pid: int
    uid: int
    gid: int


@dataclass(frozen=True)
class _Pending:
    address: bytes | str
    caller: Caller
    role: str
    subject: int = 0  # the process the socket is for (for_pid, else the caller)
    executable: str = ""
    rule: str = ""


class RequestError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def app_socket(name: str) -> socket.socket:
    """The endpoint: a datagram socket on ``@name``, credentials on every datagram."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.bind(b"\0" + name.encode())
    except OSError as exc:
        sock.close()
        raise TransportError(f"application endpoint @{name}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


class AppEndpoint:
    """The endpoint as an ``Upcall``: each datagram a request, each DONE an answer."""

    def __init__(self, sock: socket.socket, allowed_uids: Collection[int],
                 sockopts: SockoptTarget | None = None, policy: Policy | None = None,
                 events: Callable[[App], None] | None = None,
                 profiles: Collection[str] = ()) -> None:
        self.sock = sock
        self.profiles = frozenset(profiles)  # the [app.credentials.NAME] of the configuration
        self.events = events  # each ended request as an App event (tlshd status, metrics)
        self.allowed_uids = frozenset(allowed_uids)
        # [app] policy_dir: when it has rules (or problems: then it refuses), it decides
        self.policy = policy if policy is not None and (policy.rules or policy.problems) \
            else None
        self.sockopts: SockoptTarget = sockopts or KernelSockopt()
        self.pending: dict[int, _Pending] = {}
        self._seq = 0
        self.refused = 0

    def notify_fileno(self) -> int:
        return self.sock.fileno()

    def drain_notifications(self) -> int:
        return 0  # the datagrams are the requests: accept() reads them

    def accept(self) -> AcceptReply | None:
        while True:
            try:
                data, ancdata, flags, address = self.sock.recvmsg(
                    MAX_REQUEST, socket.CMSG_SPACE(_MAX_FDS * 4) + socket.CMSG_SPACE(_UCRED.size))
            except (BlockingIOError, InterruptedError):
                return None
            fds, caller = _ancillary(ancdata)
            try:
                return self._request(data, flags, address, fds, caller)
            except RequestError as exc:
                self.refused += 1
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)
                who = f"pid {caller.pid} uid {caller.uid}" if caller else "an unknown sender"
                log.warning("application request from %s refused: %s", who, exc)
                self._answer(address, {"status": exc.status, "error": str(exc)})

    def _request(self, data: bytes, flags: int, address: Any, fds: list[int],
                 caller: Caller | None) -> AcceptReply:
        if caller is None:
            raise RequestError(errno.EACCES, "no sender credentials")
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise RequestError(errno.EMSGSIZE, f"a request over {MAX_REQUEST} bytes or fds")
        if self.policy is None and caller.uid not in self.allowed_uids:
            raise RequestError(errno.EACCES, f"uid {caller.uid} may not ask for TLS "
                                             "([app] allow_users)")
        if len(fds) != 1:
            raise RequestError(errno.EINVAL, f"{len(fds)} file descriptors, not 1")
        if not address:
            raise RequestError(errno.EINVAL, "the sender has no address to answer")
        role, name, timeout_ms, for_pid = _fields(data)
        _check_tcp(fds[0])
        subject = caller.pid if for_pid is None else _same_uid(for_pid, caller.uid)
        facts = facts_of(subject, caller.uid, "outbound" if role == "client" else "inbound",
                         fds[0])
        rule = profile = ""
        if self.policy is not None:
            decision = self.policy.decide(facts, server_name=name)
            if not decision.allowed:
                raise RequestError(errno.EACCES, f"uid {caller.uid} {facts.executable or '?'}"
                                                 f": {decision.reason}")
            rule = decision.rule.name if decision.rule else ""
            profile = decision.rule.credentials if decision.rule else ""
            if profile and profile not in self.profiles:
                raise RequestError(errno.EACCES, f"rule {rule} names credentials {profile}, "
                                                 f"which no [app.credentials.{profile}] defines")
        self._seq += 1
        self.pending[fds[0]] = _Pending(address, caller, role, subject,
                                        facts.executable[:200], rule)
        via = f" (sent by pid {caller.pid})" if subject != caller.pid else ""
        log.info("application request: %s for pid %d%s uid %d%s%s%s", role, subject, via,
                 caller.uid, f" server_name={show(name, 100)}" if name else "",
                 f" rule={rule}" if rule else "", f" credentials={profile}" if profile else "")
        return AcceptReply(
            header=Header(APP_REQUEST, 0, self._seq, subject), sockfd=fds[0],
            message_type=MsgType.CLIENTHELLO if role == "client" else MsgType.SERVERHELLO,
            auth_mode=AuthMode.X509, peername=name, timeout_ms=timeout_ms, keyring=None,
            peer_identities=(), certificate=None, unknown_attrs=(), profile=profile)

    def done(self, sockfd: int, status: int, remote_auth: Sequence[int],
             tags: Sequence[str] = (), *, peer: str = "", cipher: str = "",
             data: bytes = b"") -> None:
        pending = self.pending.pop(sockfd, None)
        if pending is None:
            raise TransportError(f"DONE for fd {sockfd}, which is no application request")
        answer: dict[str, Any] = {"status": status}
        if status:
            answer["error"] = os.strerror(status)
        else:
            answer.update(peer=peer, cipher=cipher)
            if data:  # read before the hand-over: the application reads these first
                answer["data"] = base64.b64encode(data).decode()
        self._answer(pending.address, answer)
        self._report(pending, status, peer if not status else "", cipher if not status else "")

    def _report(self, pending: _Pending, status: int, peer: str, cipher: str) -> None:
        """The connection as AT-TLS shows one: rule, process, peer, cipher, status."""
        log.info("application connection: role=%s rule=%s pid=%d exe=%s peer=%s cipher=%s "
                 "status=%d", pending.role, pending.rule or "-", pending.subject,
                 show(pending.executable, 200) if pending.executable else "-",
                 show(peer, 200) if peer else "-", cipher or "-", status)
        if self.events is None:
            return
        self.events(App(role=pending.role, rule=pending.rule, app_pid=pending.subject,
                        executable=pending.executable, peer=peer[:200], cipher=cipher[:64],
                        status=status))
        flush = getattr(self.events, "flush", None)
        if flush is not None:  # the monitor has no loop turn of its own that would flush it
            flush()

    def _answer(self, address: Any, answer: dict[str, Any]) -> None:
        if not address:
            return
        with contextlib.suppress(OSError):  # a caller that went away has no one to tell
            self.sock.sendto(json.dumps({"v": 1, **answer}).encode(), address)

    def setsockopt(self, fd: int, level: int, optname: int, value: bytes) -> None:
        self.sockopts.setsockopt(fd, level, optname, value)

    def setsockopts(self, fd: int, steps: Sequence[tuple[int, int, bytes]]) -> None:
        self.sockopts.setsockopts(fd, steps)

    def close(self) -> None:
        for fd, pending in list(self.pending.items()):
            self._answer(pending.address, {"status": errno.EIO, "error": "the agent stopped"})
            del self.pending[fd]
        self.sock.close()


def _ancillary(ancdata: list[tuple[int, int, bytes]]) -> tuple[list[int], Caller | None]:
    fds: list[int] = []
    caller = None
    for level, kind, payload in ancdata:
        if level != socket.SOL_SOCKET:
            continue
        if kind == socket.SCM_RIGHTS:
            got = array.array("i")
            got.frombytes(payload[: len(payload) - len(payload) % got.itemsize])
            fds += list(got)
        elif kind == socket.SCM_CREDENTIALS and len(payload) >= _UCRED.size:
            caller = Caller(*_UCRED.unpack_from(payload))
    return fds, caller


def _same_uid(pid: int, uid: int) -> int:
    """``pid``, if it runs as ``uid`` (real and effective), else the request is refused."""
    try:
        _, real, effective = process_ids(pid)
    except (OSError, ValueError, KeyError, IndexError):
        raise RequestError(errno.ESRCH, f"for_pid {pid}: no such process") from None
    if (real, effective) != (uid, uid):
        raise RequestError(errno.EACCES, f"for_pid {pid} does not run as uid {uid}")
    return pid


def _fields(data: bytes) -> tuple[str, str | None, int | None, int | None]:
    try:
        request = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise RequestError(errno.EINVAL, "the request is not JSON") from None
    if not isinstance(request, dict) or request.get("v") != 1:
        raise RequestError(errno.EINVAL, "not a version 1 request")
    role = request.get("role")
    if role not in ("client", "server"):
        raise RequestError(errno.EINVAL, "role must be client or server")
    name = request.get("server_name")
    if name is not None and (not isinstance(name, str) or not 0 < len(name) <= MAX_NAME
                             or "\0" in name or role != "client"):
        raise RequestError(errno.EINVAL, "server_name: a name of 1 to 253 characters, "
                                         "for a client")
    timeout = request.get("timeout_ms")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int)
                                or not 1 <= timeout <= MAX_TIMEOUT_MS):
        raise RequestError(errno.EINVAL, f"timeout_ms: 1 to {MAX_TIMEOUT_MS}")
    for_pid = request.get("for_pid")
    if for_pid is not None and (isinstance(for_pid, bool) or not isinstance(for_pid, int)
                                or not 0 < for_pid < 1 << 22):
        raise RequestError(errno.EINVAL, "for_pid: a process id")
    return role, name, timeout, for_pid


def _check_tcp(fd: int) -> None:
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        raise RequestError(errno.ENOTSOCK, "the file descriptor is not a socket") from None
    with sock:
        if sock.family not in (socket.AF_INET, socket.AF_INET6) or \
                sock.type != socket.SOCK_STREAM:
            raise RequestError(errno.ENOTSOCK, "not a TCP socket")
        try:
            sock.getpeername()
        except OSError:
            raise RequestError(errno.ENOTCONN, "the socket is not connected") from None


class CombinedUpcall:
    """The kernel's upcall and the application endpoint as one ``Upcall`` for a worker:
    one pollable fd (an epoll set of both), requests from either, and each request's DONE
    and socket options back to where it came from."""

    def __init__(self, kernel: Any, app: AppEndpoint) -> None:
        self.kernel, self.app = kernel, app
        self._epoll = select.epoll()
        self._epoll.register(kernel.notify_fileno(), select.EPOLLIN)
        self._epoll.register(app.notify_fileno(), select.EPOLLIN)

    def __getattr__(self, name: str) -> Any:  # policy, session_tags, family: the kernel's
        return getattr(self.kernel, name)

    def notify_fileno(self) -> int:
        return self._epoll.fileno()

    def drain_notifications(self) -> int:
        self._epoll.poll(0)  # level-triggered: only clears this poll's readiness
        return int(self.kernel.drain_notifications())

    def accept(self) -> AcceptReply | None:
        reply: AcceptReply | None = self.kernel.accept()
        return reply if reply is not None else self.app.accept()

    def _side(self, fd: int) -> Any:
        return self.app if fd in self.app.pending else self.kernel

    def done(self, sockfd: int, status: int, remote_auth: Sequence[int],
             tags: Sequence[str] = (), *, peer: str = "", cipher: str = "",
             data: bytes = b"") -> None:
        if sockfd in self.app.pending:
            self.app.done(sockfd, status, remote_auth, tags, peer=peer, cipher=cipher,
                          data=data)
        else:
            self.kernel.done(sockfd, status, remote_auth, tags)

    def setsockopt(self, fd: int, level: int, optname: int, value: bytes) -> None:
        self._side(fd).setsockopt(fd, level, optname, value)

    def setsockopts(self, fd: int, steps: Sequence[tuple[int, int, bytes]]) -> None:
        self._side(fd).setsockopts(fd, steps)

    def close(self) -> None:
        self.app.close()
        self.kernel.close()
        self._epoll.close()
