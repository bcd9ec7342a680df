"""Privilege separation: a monitor that holds the privileges, a handshake process that holds none.

Theory of operation
-------------------
With ``[agent] privsep = true`` (the default when the agent runs as root) each worker is two
processes, as OpenSSH splits a connection:

* the **monitor** keeps what the worker was given: CAP_NET_ADMIN, the upcall (the handshake
  family's sockets), the session keyring with the consumers' keys, and read access to the
  credential files. It parses no TLS. It ACCEPTs, reads keys and files, installs the kTLS keys
  and sends DONE, each on request of its handshake process and only within policy;
* the **handshake process** runs ``tlshd.agent.worker.Worker`` confined by ``tlshd.agent.sandbox``
  (another uid, no capability, no_new_privs, seccomp) and talks to the monitor over a
  SOCK_SEQPACKET pair: one JSON request, one JSON answer, the socket of a new request as
  SCM_RIGHTS. A second pair carries READY from the monitor.

What the monitor enforces, so that a compromised handshake process gains little:

* a **handle** is the monitor's fd of a request it ACCEPTed and handed out. DONE, setsockopt
  and key reads name a handle; any other is refused. DONE retires the handle, closes the
  monitor's fd and drops the request keyring's link;
* setsockopt: only TCP_ULP "tls" and the SOL_TLS options (TX, RX, zero-copy, no-pad, payload
  length);
* keys: a client PSK only among the request's peer identities; a server PSK only by
  offered identity in the request's keyring and the session keyring; x509 keys only the
  request's certificate and private key serials. DONE's peer ids must be a key served for
  that request or a peer-certificate key the monitor made;
* files: only the credential paths of the configuration, read whole (at most 1 MiB);
* a message over 256 KiB, one that is not a JSON object of the right shape, or an unknown
  operation ends the handshake process: the monitor then answers every handle it still
  holds with DONE EIO, and so it does when the handshake process dies for any reason.
  No request is left without a DONE while the monitor lives.

What it does not hide: the handshake process holds the configured x509 private keys (it must
sign with them) and the PSKs of the requests it serves, and it sees the session secrets.
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
import signal
import socket
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tlshd.agent import sandbox
from tlshd.credentials.files import FileState, file_state
from tlshd.credentials.keys import LOCAL_KEYS, LocalKeys
from tlshd.credentials.psk import PSK
from tlshd.errors import (
    CredentialError,
    KeyAccessError,
    KeyNotFoundError,
    KeyRevokedError,
    NetlinkError,
    TlshdError,
    TransportError,
    TransportTimeoutError,
    UnknownPSKIdentityError,
)
from tlshd.handshake.secrets import HashAlg
from tlshd.keylog import KEYLOG
from tlshd.ktls import SOL_TCP, SOL_TLS, TCP_ULP, BatchSockoptError
from tlshd.netlink.messages import AcceptReply, Header, X509Serials
from tlshd.netlink.spec import MAX_SESSION_TAGS as MAX_DONE_TAGS
from tlshd.netlink.spec import AuthMode, MsgType
from tlshd.upcall import BrokenAcceptError, Upcall

log = logging.getLogger("tlshd")

MAX_MESSAGE = 256 * 1024
# Operations the handshake process does not wait on: DONE (its failure is the monitor's to log)
ONE_WAY = frozenset({"done"})
MAX_FILE = 1024 * 1024
MAX_IDENTITIES = 64
PEER_KEYS_KEPT = 4096
# TLS_TX, TLS_RX, TLS_TX_ZEROCOPY_RO, TLS_RX_EXPECT_NO_PAD, TLS_TX_MAX_PAYLOAD_LEN
SOL_TLS_OPTIONS = frozenset({1, 2, 3, 4, 5})
_ERRORS: dict[str, type[TlshdError]] = {
    cls.__name__: cls for cls in (CredentialError, KeyNotFoundError, KeyRevokedError,
                                  KeyAccessError, UnknownPSKIdentityError)}


class MonitorProtocolError(Exception):
    """The handshake process sent what no honest one sends."""


# --- the wire ---------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: object) -> bytes:
    if not isinstance(text, str):
        raise MonitorProtocolError("bytes expected")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise MonitorProtocolError("bad base64") from None


def send(sock: socket.socket, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
    data = json.dumps(message, separators=(",", ":")).encode()
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], ancillary)


def receive(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """One message and the fds it carried; (None, []) at end of stream."""
    data, ancdata, flags, _ = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(4 * 4),
                                           socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(array.array("i", payload[:len(payload) - len(payload) % 4]))
    if not data:
        return None, fds
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        _close(fds)
        raise MonitorProtocolError("message too long")
    try:
        message = json.loads(data)
    except (ValueError, RecursionError):
        _close(fds)
        raise MonitorProtocolError("not JSON") from None
    if not isinstance(message, dict):
        _close(fds)
        raise MonitorProtocolError("not an object")
    return message, fds


def _close(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


MAX_DETAIL = 512  # a DONE's peer subject and cipher name, for an application's answer
MAX_EARLY_DATA = 2**14  # and what the server sent before the hand-over: one record at most


def _detail(message: dict[str, Any], key: str) -> str:
    value = message.get(key, "")
    if not isinstance(value, str) or len(value) > MAX_DETAIL:
        raise MonitorProtocolError(f"a DONE {key} that is not a short string")
    return value


def _int(message: dict[str, Any], key: str, low: int = 0, high: int = 2**31 - 1) -> int:
    value = message.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise MonitorProtocolError(f"{key}: integer in {low}..{high} expected")
    return value


def _ints(message: dict[str, Any], key: str, limit: int = 64) -> list[int]:
    values = message.get(key)
    if not isinstance(values, list) or len(values) > limit:
        raise MonitorProtocolError(f"{key}: list expected")
    return [_int({"v": v}, "v", -(2**31), 2**31 - 1) for v in values]


def _ktls_option(message: dict[str, Any]) -> tuple[int, int, bytes]:
    level, name = _int(message, "level"), _int(message, "name")
    value = _unb64(message.get("value"))
    if not ((level == SOL_TCP and name == TCP_ULP and value.rstrip(b"\0") == b"tls")
            or (level == SOL_TLS and name in SOL_TLS_OPTIONS and len(value) <= 256)):
        raise MonitorProtocolError(f"setsockopt({level}, {name}) is not a kTLS option")
    return level, name, value


def encode_reply(reply: AcceptReply) -> dict[str, Any]:
    h = reply.header
    return {"header": [h.type, h.flags, h.seq, h.pid], "message_type": int(reply.message_type),
            "auth_mode": int(reply.auth_mode), "peername": reply.peername,
            "timeout_ms": reply.timeout_ms, "keyring": reply.keyring,
            "peer_identities": list(reply.peer_identities),
            "certificate": ([reply.certificate.cert, reply.certificate.privkey]
                            if reply.certificate else None),
            "unknown_attrs": list(reply.unknown_attrs), "profile": reply.profile}


def decode_reply(data: dict[str, Any], sockfd: int) -> AcceptReply:
    """The monitor's encoding (trusted: the monitor decoded the kernel's message)."""
    cert = data["certificate"]
    return AcceptReply(
        header=Header(*data["header"]), sockfd=sockfd,
        message_type=_enum(MsgType, data["message_type"]),
        auth_mode=_enum(AuthMode, data["auth_mode"]),
        peername=data["peername"], timeout_ms=data["timeout_ms"], keyring=data["keyring"],
        peer_identities=tuple(data["peer_identities"]),
        certificate=X509Serials(*cert) if cert else None,
        unknown_attrs=tuple(data["unknown_attrs"]), profile=str(data.get("profile", "")))


def _enum(kind: Any, value: int) -> Any:
    try:
        return kind(value)
    except ValueError:
        return value


def _psk_out(psk: PSK) -> dict[str, Any]:
    return {"serial": psk.serial, "identity": _b64(psk.identity), "key": _b64(psk.key),
            "hash": psk.hash_alg.name}


def _psk_in(data: dict[str, Any]) -> PSK:
    return PSK(data["serial"], _unb64(data["identity"]), _unb64(data["key"]),
               HashAlg[data["hash"]])


def _error_out(exc: TlshdError) -> dict[str, Any]:
    name = type(exc).__name__ if type(exc).__name__ in _ERRORS else "CredentialError"
    return {"error": name, "status": exc.status, "message": str(exc)[:500]}


# --- the monitor ------------------------------------------------------------------------------


@dataclass
class _Request:
    reply: AcceptReply
    served: set[int] = field(default_factory=set)  # key serials handed out for it


class Monitor:
    """The privileged half of a worker: serves one handshake process until it ends."""

    def __init__(self, upcall: Upcall, requests: socket.socket, notify: socket.socket,
                 paths: frozenset[str], keys: LocalKeys = LOCAL_KEYS,
                 tag_names: frozenset[str] = frozenset()) -> None:
        self.upcall, self.requests, self.notify = upcall, requests, notify
        self.paths, self.keys = paths, keys
        self.tag_names = tag_names  # the session tags a DONE may carry: the loaded ones
        self.handles: dict[int, _Request] = {}
        self.violation: str | None = None  # why the handshake process was cut off
        self._lost = False  # the upcall's READY channel failed (told to the handshake process)
        # the last PEER_KEYS_KEPT distinct peer keys made (a peer's certificate gives the same
        # key, and serial, each time: most recently made last)
        self.peer_keys: OrderedDict[int, None] = OrderedDict()
        self._ops: dict[str, Callable[[dict[str, Any]], tuple[dict[str, Any], list[int]]]] = {
            "accept": self._accept, "done": self._done, "setsockopt": self._setsockopt,
            "install": self._install,
            "client_psk": self._client_psk, "server_psk": self._server_psk,
            "x509": self._x509, "peer_key": self._peer_key, "read": self._read,
            "states": self._states}

    def serve(self, child: int, stop: Callable[[], bool]) -> int:
        """Answer the handshake process until it exits; its exit code is the worker's."""

        def stop_child() -> None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)

        self.run(stop, stop_child)
        if self.violation is not None:  # presumed compromised: it does not get to drain
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        return _exit_code(child)

    def run(self, stop: Callable[[], bool], on_stop: Callable[[], None]) -> None:
        """Answer until the channel ends or breaks; then DONE EIO for what is left.
        ``on_stop`` runs once when ``stop()`` first holds (the handshake process drains)."""
        forwarded = False
        try:
            while True:
                if stop() and not forwarded:
                    forwarded = True
                    on_stop()
                if not self._turn():
                    break
        finally:
            with contextlib.suppress(OSError):  # the handshake process sees the end at once
                self.requests.shutdown(socket.SHUT_RDWR)
            self._answer_leftovers()

    def _turn(self) -> bool:
        watched = [self.requests.fileno()] + ([] if self._lost else [self.upcall.notify_fileno()])
        try:
            ready, _, _ = select.select(watched, [], [], 0.5)
        except InterruptedError:
            return True
        if not self._lost and self.upcall.notify_fileno() in ready:
            self._forward_ready()
        if self.requests.fileno() in ready:
            return self._answer_one()
        return True

    def _forward_ready(self) -> None:
        try:
            self.upcall.drain_notifications()
            note = b"R"
        except TransportError as exc:
            log.error("upcall: %s", exc)
            note = b"L" + str(exc).encode()[:500]
            self._lost = True  # said once; a lost channel stays readable, so stop watching it
        with contextlib.suppress(BlockingIOError, OSError):
            self.notify.send(note, socket.MSG_DONTWAIT)  # a full queue: the sweep catches up

    def _answer_one(self) -> bool:
        try:
            message, fds = receive(self.requests)
            _close(fds)  # the handshake process never sends fds
            if message is None:
                return False
            op = message.get("op")
            handler = self._ops.get(op) if isinstance(op, str) else None
            if handler is None:
                raise MonitorProtocolError(f"unknown operation {str(op)[:40]!r}")
            try:
                answer, out_fds = handler(message)
            except MonitorProtocolError:
                raise
            except Exception as exc:  # a bug here must not stop the monitor
                log.exception("monitor operation %s crashed", op)
                answer, out_fds = {"fail": "internal", "message": type(exc).__name__}, []
            if op in ONE_WAY:
                return True
        except MonitorProtocolError as exc:
            log.error("handshake process broke the monitor's protocol (%s): stopping it", exc)
            self.violation = str(exc)
            return False
        except OSError as exc:
            log.error("monitor channel: %s", exc)
            return False
        try:
            send(self.requests, answer, out_fds)
        except OSError:
            return False
        return True

    def _request(self, message: dict[str, Any]) -> tuple[int, _Request]:
        handle = _int(message, "h")
        request = self.handles.get(handle)
        if request is None:
            raise MonitorProtocolError(f"handle {handle} is not a request it holds")
        return handle, request

    # --- operations ---

    def _accept(self, message: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        for _ in range(8):
            try:
                reply = self.upcall.accept()
            except BrokenAcceptError as broken:  # answered here: it never reaches the child
                log.error("malformed ACCEPT reply: %s", broken.error)
                if broken.sockfd is not None:
                    self._send_done(broken.sockfd, broken.error.status, ())
                    _close([broken.sockfd])
                continue
            except TransportTimeoutError as exc:
                return {"fail": "timeout", "message": str(exc)}, []
            except NetlinkError as exc:
                return {"fail": "netlink", "errno": exc.errno, "message": str(exc)}, []
            except TransportError as exc:
                return {"fail": "transport", "message": str(exc)}, []
            if reply is None:
                return {"none": True}, []
            self.handles[reply.sockfd] = _Request(reply)
            # the credential files' states as of now: the handshake process picks its
            # context right after this and would otherwise ask for them (tlshd.credentials.files)
            states = [[path, list(file_state(Path(path)))] for path in sorted(self.paths)]
            return ({"h": reply.sockfd, "reply": encode_reply(reply), "states": states},
                    [reply.sockfd])
        return {"none": True}, []

    def _done(self, message: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        handle, request = self._request(message)
        status = _int(message, "status", 0, 4095)
        remote = _ints(message, "remote", 8)
        if any(r not in request.served and r not in self.peer_keys
               and r not in request.reply.peer_identities for r in remote):
            raise MonitorProtocolError("a peer id that is not this request's")
        tags = self._tags(message)
        peer, cipher = (_detail(message, key) for key in ("peer", "cipher"))
        data = _unb64(message.get("data", ""))
        if len(data) > MAX_EARLY_DATA:
            raise MonitorProtocolError("DONE data longer than a record")
        del self.handles[handle]
        answer = self._send_done(handle, status, remote, tags, peer=peer, cipher=cipher,
                                 data=data)
        if answer.get("fail"):
            log.error("DONE for fd %d failed: %s", handle, answer["message"])
        _close([handle])
        self.keys.release(request.reply)
        return answer, []

    def _tags(self, message: dict[str, Any]) -> tuple[str, ...]:
        """The session tags of a DONE: loaded tag names only, each once, at most 64."""
        tags = message.get("tags", [])
        if (not isinstance(tags, list) or len(tags) > MAX_DONE_TAGS
                or len(set(tags)) != len(tags) or not all(
                    isinstance(t, str) and t in self.tag_names for t in tags)):
            raise MonitorProtocolError("session tags that are not the loaded ones")
        return tuple(tags)

    def _send_done(self, fd: int, status: int, remote: Sequence[int],
                   tags: Sequence[str] = (), *, peer: str = "", cipher: str = "",
                   data: bytes = b"") -> dict[str, Any]:
        try:
            self.upcall.done(fd, status, remote, tags, peer=peer, cipher=cipher, data=data)
        except TlshdError as exc:
            return {"fail": "done", "message": str(exc)}
        return {}

    def _setsockopt(self, message: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        handle, _ = self._request(message)
        level, name, value = _ktls_option(message)
        try:
            self.upcall.setsockopt(handle, level, name, value)
        except OSError as exc:
            return {"errno": exc.errno or errno.EIO}, []
        return {}, []

    def _install(self, message: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        """Several kTLS options in order (TCP_ULP, TLS_TX, TLS_RX: one round trip); the
        first that fails stops the rest and is named by its index."""
        handle, _ = self._request(message)
        steps = message.get("steps")
        if not isinstance(steps, list) or not 0 < len(steps) <= 8:
            raise MonitorProtocolError("steps: list expected")
        options = [_ktls_option(step) if isinstance(step, dict) else _ktls_option({})
                   for step in steps]
        try:  # one dup of the socket (one datagram to kernel-sim) for all of them
            self.upcall.setsockopts(handle, options)
        except BatchSockoptError as exc:
            return {"failed": exc.index, "errno": exc.error.errno or errno.EIO}, []
        return {}, []

    def _client_psk(self, message: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        _, request = self._request(message)
        serials = _ints(message, "serials")
        if any(s not in request.reply.peer_identities for s in serials):
            raise MonitorProtocolError("a PSK serial the request does not name")
        try:
            psk, untried = self.keys.client_psk(request.reply, serials)
        except TlshdError as exc:
            return _error_out(exc), []
        request.served.add(psk.serial)
        return {"psk": _psk_out(psk), "untried": list(untried)}, []

    def _server_psk(self, message: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        _, request = self._request(message)
        offered = message.get("identities")
        if not isinstance(offered, list) or len(offered) > MAX_IDENTITIES:
            raise MonitorProtocolError("identities: list expected")
        try:
            psk = self.keys.server_psk(request.reply, [_unb64(i) for i in offered])
        except TlshdError as exc:
            return _error_out(exc), []
        if psk is None:
            return {"none": True}, []
        request.served.add(psk.serial)
        return {"psk": _psk_out(psk)}, []

    def _x509(self, message: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        _, request = self._request(message)
        try:
            cert, key = self.keys.x509(request.reply)
        except TlshdError as exc:
            return _error_out(exc), []
        return {"cert": _b64(cert), "key": _b64(key)}, []

    def _peer_key(self, message: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        der = _unb64(message.get("der"))
        try:
            serial = self.keys.peer_key(der)
        except TlshdError as exc:
            return _error_out(exc), []
        self.peer_keys[serial] = None
        self.peer_keys.move_to_end(serial)
        while len(self.peer_keys) > PEER_KEYS_KEPT:
            self.peer_keys.popitem(last=False)
        return {"serial": serial}, []

    def _path(self, value: object) -> str:
        if not isinstance(value, str) or value not in self.paths:
            raise MonitorProtocolError(f"{str(value)[:80]!r} is not a configured credential file")
        return value

    def _read(self, message: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        path = self._path(message.get("path"))
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_FILE + 1)
        except OSError as exc:
            return {"errno": exc.errno or errno.EIO}, []
        if len(data) > MAX_FILE:
            return {"errno": errno.EFBIG}, []
        return {"data": _b64(data)}, []

    def _states(self, message: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        paths = message.get("paths")
        if not isinstance(paths, list) or len(paths) > 16:
            raise MonitorProtocolError("paths: list expected")
        return {"states": [list(file_state(Path(self._path(p)))) for p in paths]}, []

    def _answer_leftovers(self) -> None:
        """The handshake process is gone: every request it held gets DONE EIO now."""
        for handle, request in list(self.handles.items()):
            log.error("handshake process ended with a request in flight (peer %s): DONE EIO",
                      request.reply.peername or "-")
            self._send_done(handle, errno.EIO, ())
            _close([handle])
            self.keys.release(request.reply)
        self.handles.clear()


def _exit_code(child: int) -> int:
    try:
        _, status = os.waitpid(child, 0)
    except ChildProcessError:
        return 1
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    log.error("handshake process killed by signal %d", os.WTERMSIG(status))
    return 1


# --- the handshake process's side ---------------------------------------------------------


class MonitorClient:
    """What the Worker uses in the handshake process: its Upcall, RequestKeys and FileSource,
    each a request to the monitor."""

    def __init__(self, requests: socket.socket, notify: socket.socket) -> None:
        self.requests, self.notify = requests, notify
        self.notify.setblocking(False)
        self._handles: dict[int, int] = {}  # our fd -> the monitor's handle
        self._states: dict[str, FileState] = {}  # credential files, as of the last ACCEPT

    def _call(self, message: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        try:
            send(self.requests, message)
            answer, fds = receive(self.requests)
        except (OSError, MonitorProtocolError) as exc:
            raise TransportError(f"monitor: {exc}") from None
        if answer is None:
            raise TransportError("monitor: the channel closed")
        if answer.get("fail") == "internal":
            _close(fds)
            raise TlshdError(f"monitor: internal error ({answer.get('message')})",
                             status=errno.EIO)
        return answer, fds

    def _handle(self, fd: int) -> int:
        try:
            return self._handles[fd]
        except KeyError:
            raise TransportError(f"fd {fd} is not a request from the monitor") from None

    # Upcall

    def notify_fileno(self) -> int:
        return self.notify.fileno()

    def drain_notifications(self) -> int:
        count = 0
        while True:
            try:
                note = self.notify.recv(1024)
            except (BlockingIOError, InterruptedError):
                return count
            if not note:
                raise TransportError("monitor: the READY channel closed")
            if note.startswith(b"L"):
                raise TransportError(note[1:].decode(errors="replace"))
            count += 1

    def accept(self) -> AcceptReply | None:
        answer, fds = self._call({"op": "accept"})
        if "h" in answer and len(fds) == 1:
            self._handles[fds[0]] = answer["h"]
            self._states = {path: tuple(state) for path, state in answer.get("states", ())}
            return decode_reply(answer["reply"], fds[0])
        _close(fds)
        fail = answer.get("fail")
        if fail == "timeout":
            raise TransportTimeoutError(answer["message"])
        if fail == "netlink":
            raise NetlinkError(answer["errno"], "ACCEPT")
        if fail == "transport":
            raise TransportError(answer["message"])
        return None

    def done(self, sockfd: int, status: int, remote_auth: Sequence[int],
             tags: Sequence[str] = (), *, peer: str = "", cipher: str = "",
             data: bytes = b"") -> None:
        handle = self._handles.pop(sockfd, None)
        if handle is None:
            raise TransportError(f"DONE for fd {sockfd}, which is not a request")
        message: dict[str, Any] = {"op": "done", "h": handle, "status": status,
                                   "remote": list(remote_auth)}
        if tags:
            message["tags"] = list(tags)
        if peer or cipher:
            message["peer"], message["cipher"] = peer[:MAX_DETAIL], cipher[:MAX_DETAIL]
        if data:
            message["data"] = _b64(data[:MAX_EARLY_DATA])
        try:  # one way: the monitor logs a DONE the kernel refused
            send(self.requests, message)
        except OSError as exc:
            raise TransportError(f"monitor: {exc}") from None

    def setsockopt(self, fd: int, level: int, optname: int, value: bytes) -> None:
        answer, _ = self._call({"op": "setsockopt", "h": self._handle(fd), "level": level,
                                "name": optname, "value": _b64(value)})
        if "errno" in answer:
            raise OSError(answer["errno"], os.strerror(answer["errno"]))

    def setsockopts(self, fd: int, steps: Sequence[tuple[int, int, bytes]]) -> None:
        """All of ``steps`` in one request (tlshd.ktls.BatchSockoptPort)."""
        answer, _ = self._call({"op": "install", "h": self._handle(fd), "steps": [
            {"level": level, "name": name, "value": _b64(value)} for level, name, value in steps]})
        if "errno" in answer:
            error = OSError(answer["errno"], os.strerror(answer["errno"]))
            raise BatchSockoptError(answer["failed"], error)

    def close(self) -> None:
        self.requests.close()
        self.notify.close()

    # RequestKeys

    def _keys_call(self, message: dict[str, Any]) -> dict[str, Any]:
        answer, _ = self._call(message)
        if "error" in answer:
            cls = _ERRORS.get(answer["error"], CredentialError)
            raise cls(answer["message"], status=answer["status"])
        return answer

    def client_psk(self, reply: AcceptReply, serials: Sequence[int]
                   ) -> tuple[PSK, tuple[int, ...]]:
        answer = self._keys_call({"op": "client_psk", "h": self._handle(reply.sockfd),
                                  "serials": list(serials)})
        return _psk_in(answer["psk"]), tuple(answer["untried"])

    def server_psk(self, reply: AcceptReply, identities: Sequence[bytes]) -> PSK | None:
        answer = self._keys_call({"op": "server_psk", "h": self._handle(reply.sockfd),
                                  "identities": [_b64(i) for i in identities[:MAX_IDENTITIES]]})
        return None if answer.get("none") else _psk_in(answer["psk"])

    def x509(self, reply: AcceptReply) -> tuple[bytes, bytes]:
        answer = self._keys_call({"op": "x509", "h": self._handle(reply.sockfd)})
        return _unb64(answer["cert"]), _unb64(answer["key"])

    def peer_key(self, der: bytes) -> int:
        return int(self._keys_call({"op": "peer_key", "der": _b64(der)})["serial"])

    def release(self, reply: AcceptReply) -> None:
        """The monitor drops the request keyring's link at DONE."""

    # FileSource

    def read(self, path: Path) -> bytes:
        answer, _ = self._call({"op": "read", "path": str(path)})
        if "errno" in answer:
            raise OSError(answer["errno"], os.strerror(answer["errno"]), str(path))
        return _unb64(answer["data"])

    def states(self, paths: Sequence[Path]) -> tuple[FileState, ...]:
        """As of the last ACCEPT (the monitor sends them with it), else asked for."""
        cached = tuple(self._states.get(str(p)) for p in paths)
        if all(state is not None for state in cached):
            return cached  # type: ignore[return-value]
        answer, _ = self._call({"op": "states", "paths": [str(p) for p in paths]})
        return tuple(tuple(s) for s in answer["states"])


# --- the split --------------------------------------------------------------------------------


def credential_paths(sides: Sequence[object]) -> frozenset[str]:
    """The files the monitor reads for its handshake process: each side's configured
    certificate, key, trust store (a bundle: a directory is read by the handshake process
    itself), CRL and post-quantum pair."""
    out = set()
    for side in sides:
        for key in ("certificate", "private_key", "truststore", "crl", "pq_certificate",
                    "pq_private_key"):
            path = getattr(side, key, None)
            if path is not None:
                out.add(str(path))
    return frozenset(out)


def log_problem(exc: TlshdError) -> None:
    log.error("handshake process cannot serve: %s", exc)


def split(upcall: Upcall, user: sandbox.WorkerUser, paths: frozenset[str],
          stop: Callable[[], bool], serve: Callable[[MonitorClient], int],
          report: Callable[[TlshdError], None] = log_problem,
          tag_names: frozenset[str] = frozenset()) -> int:
    """Fork the handshake process, confine it and run ``serve`` there; be its monitor here.
    Returns the handshake process's exit code. A TlshdError in the handshake process (it
    cannot be confined, or cannot serve) goes to ``report`` there."""
    requests, child_requests = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    notify, child_notify = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        _be_handshake_process(upcall, user, (requests, notify), (child_requests, child_notify),
                              serve, report)
    child_requests.close()
    child_notify.close()
    _forward_sigterm(pid)
    try:
        return Monitor(upcall, requests, notify, paths, tag_names=tag_names).serve(pid, stop)
    finally:
        requests.close()
        notify.close()


def _be_handshake_process(upcall: Upcall, user: sandbox.WorkerUser,
                          monitor_ends: tuple[socket.socket, ...],
                          ends: tuple[socket.socket, socket.socket],
                          serve: Callable[[MonitorClient], int],
                          report: Callable[[TlshdError], None]) -> None:
    code = 1
    try:
        for sock in monitor_ends:
            sock.close()
        upcall.close()
        KEYLOG.open()  # SSLKEYLOGFILE, if set, is root's to open
        sandbox.confine(user)
        code = serve(MonitorClient(*ends))
    except TlshdError as exc:
        report(exc)
    except BaseException:  # never return into the monitor's code
        log.exception("handshake process failed")
    finally:
        logging.shutdown()
        os._exit(code)


def _forward_sigterm(child: int) -> None:
    """SIGTERM to the monitor (the supervisor's stop) reaches the handshake process at once."""
    previous = signal.getsignal(signal.SIGTERM)

    def forward(signum: int, frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGTERM)
        if callable(previous):
            previous(signum, frame)  # type: ignore[arg-type]

    signal.signal(signal.SIGTERM, forward)
