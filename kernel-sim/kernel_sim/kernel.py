"""The simulated kernel: per-namespace netlink endpoints, the handshake family, kTLS.

Theory of operation
-------------------
Transport. Each simulated network namespace has one listening Unix
SOCK_SEQPACKET socket bound to an *abstract* name (default
``\\0kernel-sim/genl``). Abstract Unix names are scoped by network namespace,
so an agent started with ``ip netns exec NS`` that connects to that name
reaches exactly NS's endpoint, as its AF_NETLINK socket would reach NS's
generic netlink. One connection is one agent netlink socket: it gets a port
id, joins groups, sends requests and receives replies and multicasts. Each
datagram holds netlink messages byte-identical to the kernel's. The
differences from AF_NETLINK, all at the transport edge:

* joining a multicast group (``setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP)``)
  is a request to the private ``kernel_sim`` family (KSIM_CMD_ADD_MEMBERSHIP);
* the ACCEPT reply carries the socket as an SCM_RIGHTS fd (the kernel
  installs it directly in the agent's fd table); the SOCKFD attribute holds
  the simulator's own fd number and the agent's transport substitutes the
  received fd;
* ``setsockopt(TCP_ULP)`` / ``setsockopt(SOL_TLS, ...)`` on the agent's fd
  cannot reach this model through the host kernel, so the agent sends the
  same (level, optname, optval bytes) with its fd number to the private
  family (KSIM_CMD_SETSOCKOPT); the answer is an NLMSG_ERROR with the errno
  the kernel's setsockopt would return.

DONE's SOCKFD and SETSOCKOPT's fd are resolved in the sender's own fd table,
like ``sockfd_lookup``: the sender's pid comes from SCM_CREDENTIALS and the fd
from ``pidfd_getfd``.

Threads. One event-loop thread serves the endpoints (the "netlink receive
path"). Consumers call ``tls_*_hello_*`` and ``tls_handshake_cancel`` from
their own threads; READY is multicast from the submitting thread, like
``handshake_req_submit`` does. ``RequestTable.lock`` guards request state.
"""

from __future__ import annotations

import array
import contextlib
import errno
import itertools
import os
import selectors
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kernel_sim import genl, proc
from kernel_sim.faults import Faults, malform_accept
from kernel_sim.handshake import netlink as hsnl
from kernel_sim.handshake.request import HandshakeNet, HandshakeReq, RequestTable, SubmitError
from kernel_sim.handshake.tlshd import (
    AUTH_PSK,
    AUTH_UNAUTH,
    AUTH_X509,
    MSG_TYPE_CLIENTHELLO,
    MSG_TYPE_SERVERHELLO,
    TLS_MAX_PEERIDS,
    TLSHandshakeArgs,
    TLSHandshakeReq,
    TLSProto,
)
from kernel_sim.netns import netns_inode, run_in_netns, socket_netns_inode
from kernel_sim.profile import MAINLINE, KernelProfile
from kernel_sim.tls_ulp import TCP_ULP, KTLSSocket, ULPRegistry

DEFAULT_ENDPOINT = "kernel-sim"
HANDSHAKE_FAMILY_ID = 0x22
HANDSHAKE_GROUP_IDS = (0x0B, 0x0C)  # "none", "tlshd"
KSIM_FAMILY_NAME = "kernel_sim"
KSIM_FAMILY_ID = 0x23
KSIM_CMD_ADD_MEMBERSHIP = 1
KSIM_CMD_DROP_MEMBERSHIP = 2
KSIM_CMD_SETSOCKOPT = 3
KSIM_A_GROUP = 1
KSIM_A_SOCKFD = 2
KSIM_A_LEVEL = 3
KSIM_A_OPTNAME = 4
KSIM_A_OPTVAL = 5
SO_COOKIE = 57
MAX_DATAGRAM = 65536

_KSIM_OPS = {
    KSIM_CMD_ADD_MEMBERSHIP: genl.OpPolicy(KSIM_A_GROUP, {KSIM_A_GROUP: genl.AttrPolicy("u32")}),
    KSIM_CMD_DROP_MEMBERSHIP: genl.OpPolicy(KSIM_A_GROUP, {KSIM_A_GROUP: genl.AttrPolicy("u32")}),
    KSIM_CMD_SETSOCKOPT: genl.OpPolicy(KSIM_A_OPTVAL, {
        KSIM_A_SOCKFD: genl.AttrPolicy("s32"),
        KSIM_A_LEVEL: genl.AttrPolicy("u32"),
        KSIM_A_OPTNAME: genl.AttrPolicy("u32"),
        KSIM_A_OPTVAL: genl.AttrPolicy("binary"),
    }),
}


def endpoint_address(name: str) -> bytes:
    """The abstract Unix address of a simulated namespace's netlink endpoint."""
    return b"\0" + name.encode() + b"/genl"


def sock_cookie(sock: socket.socket) -> int:
    return int(struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0])


@dataclass(eq=False)
class AgentSock:
    """One agent's netlink socket (a connection to a namespace's endpoint)."""

    conn: socket.socket
    portid: int
    netns: NetNS
    groups: set[int] = field(default_factory=set)
    send_lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(eq=False)
class NetNS:
    """A simulated namespace: handshake state, kTLS sockets, its endpoint and agents."""

    name: str | None
    inode: int
    hn: HandshakeNet
    ulp: ULPRegistry
    listener: socket.socket | None = None
    agents: list[AgentSock] = field(default_factory=list)


@dataclass(frozen=True)
class TraceEvent:
    """Like the ``handshake:*`` tracepoints: monotonic time, event, namespace, details."""

    ts: float
    event: str
    netns: str | None
    sock: int | None
    info: dict[str, Any]


class Kernel:
    """A simulated kernel. Use as a context manager or call start()/stop()."""

    def __init__(
        self,
        *,
        endpoint: str = DEFAULT_ENDPOINT,
        profile: KernelProfile = MAINLINE,
        faults: Faults | None = None,
        enforce_caps: bool = True,
    ) -> None:
        self.endpoint = endpoint
        self.profile = profile
        self.faults = faults or Faults()
        self.enforce_caps = enforce_caps
        self.proto = TLSProto(profile)
        self.table = RequestTable(self._notify, self._trace_req)
        self.trace: deque[TraceEvent] = deque(maxlen=100_000)
        self._namespaces: dict[int, NetNS] = {}
        self._ns_lock = threading.Lock()
        self._sockets: dict[int, socket.socket] = {}  # cookie -> consumer socket
        self.adopted_on_ulp: list[int] = []  # cookies of sockets adopted at TCP_ULP
        self._ports = itertools.count(1000)
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._family = hsnl.family_desc(profile, HANDSHAKE_FAMILY_ID, HANDSHAKE_GROUP_IDS)
        self._ksim_family = genl.FamilyDesc(
            KSIM_FAMILY_NAME, KSIM_FAMILY_ID, 1, KSIM_A_OPTVAL, _KSIM_OPS, ()
        )

    # --- lifecycle ---------------------------------------------------------

    def __enter__(self) -> Kernel:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._loop, name="kernel-sim", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop and close every endpoint; a second call does nothing."""
        if self._wake_w.fileno() < 0:
            return
        self._stopping = True
        self._wake_w.send(b"x")
        if self._thread is not None:
            self._thread.join(timeout=5)
        for ns in self._all_netns():
            self._close_endpoint(ns)
        for cookie in self.adopted_on_ulp:  # the copies this model took (_apply_sockopt)
            with contextlib.suppress(KeyError, OSError):
                self._sockets.pop(cookie).close()
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    # --- namespaces --------------------------------------------------------

    def add_netns(self, name: str | None = None, *, pending_max: int | None = None) -> NetNS:
        """Give namespace ``name`` (None: this process's) a handshake family endpoint."""
        ns = self._netns_for_inode(netns_inode(name), name)
        if pending_max is not None:
            ns.hn.pending_max = pending_max
        listener = run_in_netns(name, self._make_listener)
        ns.listener = listener
        self._register(listener, ("listen", ns))
        return ns

    def _make_listener(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.bind(endpoint_address(self.endpoint))
        sock.listen(64)
        sock.setblocking(False)
        return sock

    def _netns_for_inode(self, inode: int, name: str | None = None) -> NetNS:
        with self._ns_lock:  # consumers' threads and the loop both look namespaces up
            ns = self._namespaces.get(inode)
            if ns is None:
                ns = NetNS(name, inode, HandshakeNet(name or "init"), ULPRegistry())
                self._namespaces[inode] = ns
            return ns

    def _all_netns(self) -> list[NetNS]:
        with self._ns_lock:
            return list(self._namespaces.values())

    def netns_of(self, sock: socket.socket | int) -> NetNS:
        """``sock_net(sk)``: every namespace has handshake state, endpoint or not."""
        return self._netns_for_inode(socket_netns_inode(sock))

    def remove_netns(self, name: str | None) -> None:
        """The namespace exits: pending requests complete with ETIMEDOUT, agents are cut off."""
        ns = self._namespaces.get(netns_inode(name))
        if ns is None:
            return
        status = self.profile.internal_status(errno.ETIMEDOUT)
        self.table.net_exit(ns.hn, status, complete_pending=self.profile.net_exit_completes_pending)
        self._close_endpoint(ns)

    def _close_endpoint(self, ns: NetNS) -> None:
        for agent in list(ns.agents):
            self._drop_agent(agent)
        if ns.listener is not None:
            self._unregister(ns.listener)
            ns.listener.close()
            ns.listener = None

    def listeners(self, ns: NetNS) -> int:
        return sum(1 for a in ns.agents if HANDSHAKE_GROUP_IDS[1] in a.groups)

    # --- consumer API (include/net/handshake.h) -----------------------------

    def tls_client_hello_anon(self, args: TLSHandshakeArgs) -> int:
        treq = TLSHandshakeReq.from_args(args, MSG_TYPE_CLIENTHELLO, AUTH_UNAUTH)
        return self._submit(args, treq)

    def tls_client_hello_x509(self, args: TLSHandshakeArgs) -> int:
        treq = TLSHandshakeReq.from_args(args, MSG_TYPE_CLIENTHELLO, AUTH_X509)
        treq.certificate, treq.privkey = args.my_cert, args.my_privkey
        return self._submit(args, treq)

    def tls_client_hello_psk(self, args: TLSHandshakeArgs) -> int:
        if not args.my_peerids or len(args.my_peerids) > TLS_MAX_PEERIDS:
            return -errno.EINVAL
        treq = TLSHandshakeReq.from_args(args, MSG_TYPE_CLIENTHELLO, AUTH_PSK)
        treq.peerids = tuple(args.my_peerids)
        return self._submit(args, treq)

    def tls_server_hello_x509(self, args: TLSHandshakeArgs) -> int:
        treq = TLSHandshakeReq.from_args(args, MSG_TYPE_SERVERHELLO, AUTH_X509)
        treq.certificate, treq.privkey = args.my_cert, args.my_privkey
        return self._submit(args, treq)

    def tls_server_hello_psk(self, args: TLSHandshakeArgs) -> int:
        treq = TLSHandshakeReq.from_args(args, MSG_TYPE_SERVERHELLO, AUTH_PSK)
        treq.peerids = (args.my_peerids[0] if args.my_peerids else 0,)
        return self._submit(args, treq)

    def tls_handshake_cancel(self, sock: socket.socket) -> bool:
        return self.table.cancel(sock_cookie(sock))

    def sock_release(self, sock: socket.socket) -> None:
        """The consumer closes its socket: ``handshake_sk_destruct`` and the ULP go with it."""
        with contextlib.suppress(OSError):
            cookie = sock_cookie(sock)
            self.table.destruct(cookie)
            self._sockets.pop(cookie, None)
            self.netns_of(sock).ulp.forget(sock)
        sock.close()

    def adopt(self, sock: socket.socket) -> None:
        """An application's TCP socket becomes one of the simulated kernel's: on Linux every
        TCP socket can take the ``tls`` ULP (``setsockopt(TCP_ULP)`` on an established one).
        Here the sockets the simulator plays the kernel for must be named: those of its
        consumers' requests, and these. An agent's KSIM setsockopt then reaches it, and
        ``ktls`` gives its record layer. ``sock_release`` forgets it. A socket not named
        here that an agent sets the ULP on is adopted then, as on Linux (``socket_of``)."""
        self._sockets[sock_cookie(sock)] = sock

    def socket_of(self, cookie: int) -> socket.socket:
        """The socket of a cookie (SO_COOKIE) this model plays the kernel for: KeyError if
        none. With ``ktls``: the record layer of a socket another process holds."""
        return self._sockets[cookie]

    def ktls(self, sock: socket.socket) -> KTLSSocket:
        """The consumer's kTLS view of its socket (after the agent installed the ULP)."""
        ktls = self.netns_of(sock).ulp.lookup(sock)
        if ktls is None:
            raise OSError(errno.ENOPROTOOPT, "no TLS ULP on this socket")
        return ktls

    def _submit(self, args: TLSHandshakeArgs, treq: TLSHandshakeReq) -> int:
        sock = args.sock
        try:
            cookie, ns = sock_cookie(sock), self.netns_of(sock)
        except OSError:
            return -errno.EINVAL
        req = HandshakeReq(proto=self.proto, sock_key=cookie, sock=sock, priv=treq)
        try:
            self.table.submit(ns.hn, req)
        except SubmitError as exc:
            return exc.errno
        self._sockets[cookie] = sock
        return 0

    # --- READY multicast ------------------------------------------------------

    def _notify(self, hn: HandshakeNet, handler_class: int) -> int:
        """``handshake_genl_notify``: -ESRCH unless someone in the netns joined the group."""
        ns = next(n for n in self._all_netns() if n.hn is hn)
        group = HANDSHAKE_GROUP_IDS[handler_class]
        members = [a for a in ns.agents if group in a.groups]
        if not members:
            return -errno.ESRCH
        if self.faults.take_drop_ready():
            self._trace(ns, "ready_dropped", None, {})
            return 0
        copies = 2 if self.faults.take_duplicate_ready() else 1
        msg = hsnl.ready_message(HANDSHAKE_FAMILY_ID, handler_class)
        for agent in members:
            for _ in range(copies):
                self._multicast(agent, msg)
        return 0

    def _multicast(self, agent: AgentSock, msg: bytes) -> None:
        delay = self.faults.delay_ready_s
        if delay > 0:
            threading.Timer(delay, self._send_quiet, (agent, msg)).start()
        else:
            self._send_quiet(agent, msg)

    def _send_quiet(self, agent: AgentSock, msg: bytes) -> None:
        """Multicast never blocks the kernel: a full receiver loses the message (ENOBUFS)."""
        with agent.send_lock, contextlib.suppress(OSError):
            agent.conn.send(msg, socket.MSG_DONTWAIT)

    # --- event loop -------------------------------------------------------------

    def _register(self, sock: socket.socket, data: Any) -> None:
        self._sel.register(sock, selectors.EVENT_READ, data)
        self._wake_w.send(b"r")

    def _unregister(self, sock: socket.socket) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(sock)

    def _loop(self) -> None:
        while not self._stopping:
            for key, _ in self._sel.select(timeout=1.0):
                if key.data is None:
                    self._wake_r.recv(4096)
                elif key.data[0] == "listen":
                    self._accept_agent(key.data[1])
                else:
                    self._serve_agent(key.data[1])

    def _accept_agent(self, ns: NetNS) -> None:
        assert ns.listener is not None
        try:
            conn, _ = ns.listener.accept()
        except BlockingIOError:
            return
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        agent = AgentSock(conn, next(self._ports), ns)
        ns.agents.append(agent)
        self._sel.register(conn, selectors.EVENT_READ, ("agent", agent))

    def _drop_agent(self, agent: AgentSock) -> None:
        self._unregister(agent.conn)
        with contextlib.suppress(ValueError):
            agent.netns.agents.remove(agent)
        agent.conn.close()

    def _serve_agent(self, agent: AgentSock) -> None:
        try:
            data, anc, _flags, _ = agent.conn.recvmsg(MAX_DATAGRAM, socket.CMSG_SPACE(12))
        except OSError:
            data = b""
        if not data:
            self._drop_agent(agent)
            return
        pid = _sender_pid(anc)
        for msg in genl.split_messages(data):
            self._handle(agent, pid, msg)

    # --- request dispatch (netlink_rcv_skb + genl_rcv_msg) ------------------------

    def _handle(self, agent: AgentSock, pid: int, msg: bytes) -> None:
        header = genl.parse_header(msg)
        if not header.flags & genl.NLM_F_REQUEST or header.type < genl.NLMSG_MIN_TYPE:
            if header.flags & genl.NLM_F_ACK:
                self._reply(agent, genl.nlmsg_error(0, msg, portid=agent.portid))
            return
        try:
            self._dispatch(agent, pid, genl.parse_genl(msg))
        except genl.NetlinkError as exc:
            self._reply(agent, genl.nlmsg_error(exc.errno, msg, portid=agent.portid))
            return
        except Exception as exc:  # a model bug must not stop the "kernel": report EIO
            self._trace(agent.netns, "internal_error", None, {"error": repr(exc)})
            self._reply(agent, genl.nlmsg_error(-errno.EIO, msg, portid=agent.portid))
            return
        if header.flags & genl.NLM_F_ACK:  # netlink_rcv_skb: ack on error or when asked
            self._reply(agent, genl.nlmsg_error(0, msg, portid=agent.portid))

    def _dispatch(self, agent: AgentSock, pid: int, msg: genl.GenlMessage) -> None:
        family = msg.header.type
        if family == genl.GENL_ID_CTRL and msg.cmd == genl.CTRL_CMD_GETPOLICY:
            self._reply(agent, genl.ctrl_policy_dump(msg, (self._family, self._ksim_family),
                                                     portid=agent.portid))
        elif family == genl.GENL_ID_CTRL:
            desc = genl.ctrl_lookup(msg, (self._family, self._ksim_family))
            reply = genl.ctrl_family_reply(desc, seq=msg.header.seq, portid=agent.portid)
            self._reply(agent, reply)
        elif family == HANDSHAKE_FAMILY_ID:
            self._handshake_op(agent, pid, msg)
        elif family == KSIM_FAMILY_ID:
            self._ksim_op(agent, pid, msg)
        else:
            raise genl.NetlinkError(-errno.ENOENT, f"no family {family}")

    def _check_perm(self, op: genl.OpPolicy, pid: int) -> None:
        if op.admin_perm and self.enforce_caps and not proc.has_capability(pid):
            raise genl.NetlinkError(-errno.EPERM, "CAP_NET_ADMIN required")

    def _handshake_op(self, agent: AgentSock, pid: int, msg: genl.GenlMessage) -> None:
        op = self._family.ops.get(msg.cmd)
        if op is None:
            raise genl.NetlinkError(-errno.EOPNOTSUPP, f"handshake command {msg.cmd}")
        self._check_perm(op, pid)
        if msg.cmd == hsnl.CMD_ACCEPT:
            self._accept(agent, msg)
            return
        hsnl.done_doit(
            self.table, self.proto, msg, sock_key_of_fd=lambda fd: self._peer_cookie(pid, fd),
            on_found=lambda req: self._trace(agent.netns, "cmd_done", req.sock_key, {"pid": pid}),
        )

    def _accept(self, agent: AgentSock, msg: genl.GenlMessage) -> None:
        try:
            result = hsnl.accept_doit(
                self.table, agent.netns.hn, self.proto, msg, family_id=HANDSHAKE_FAMILY_ID,
                portid=agent.portid, sockfd_for=lambda s: s.fileno(),
            )
        except genl.NetlinkError as exc:
            self._trace(agent.netns, "cmd_accept_err", None, {"errno": exc.errno})
            raise
        self._trace(agent.netns, "cmd_accept", sock_cookie(result.sock), {"portid": agent.portid})
        reply, fds = self._maybe_malform(result.reply, [result.sock.fileno()])
        self._reply(agent, reply, fds)

    def _maybe_malform(self, reply: bytes, fds: list[int]) -> tuple[bytes, list[int]]:
        mode = self.faults.take_malformed_accept()
        if mode is None:
            return reply, fds
        return malform_accept(reply, mode), ([] if mode == "no_fd" else fds)

    def _peer_cookie(self, pid: int, fd: int) -> int:
        """``sockfd_lookup`` in the sender's table; any failure is -EBADF."""
        try:
            dup = proc.get_peer_fd(pid, fd)
        except OSError as exc:
            raise genl.NetlinkError(-errno.EBADF, f"fd {fd}: {exc.strerror}") from None
        try:
            return int(struct.unpack("=Q", _cookie_of_fd(dup))[0])
        except OSError as exc:
            raise genl.NetlinkError(-errno.EBADF, f"fd {fd}: not a socket") from exc
        finally:
            os.close(dup)

    def _ksim_op(self, agent: AgentSock, pid: int, msg: genl.GenlMessage) -> None:
        op = _KSIM_OPS.get(msg.cmd)
        if op is None:
            raise genl.NetlinkError(-errno.EOPNOTSUPP, f"kernel_sim command {msg.cmd}")
        attrs = genl.validate_attrs(msg.attr_data, op)
        if msg.cmd in (KSIM_CMD_ADD_MEMBERSHIP, KSIM_CMD_DROP_MEMBERSHIP):
            self._membership(agent, msg.cmd, attrs)
        else:
            self._setsockopt(pid, attrs)

    def _membership(self, agent: AgentSock, cmd: int, attrs: dict[int, list[bytes]]) -> None:
        if KSIM_A_GROUP not in attrs:
            raise genl.NetlinkError(-errno.EINVAL, "GROUP missing")
        group = genl.get_u32(attrs[KSIM_A_GROUP][0])
        if group not in HANDSHAKE_GROUP_IDS:
            raise genl.NetlinkError(-errno.EINVAL, f"no multicast group {group}")
        if cmd == KSIM_CMD_ADD_MEMBERSHIP:
            agent.groups.add(group)
        else:
            agent.groups.discard(group)

    def _setsockopt(self, pid: int, attrs: dict[int, list[bytes]]) -> None:
        for needed in (KSIM_A_SOCKFD, KSIM_A_LEVEL, KSIM_A_OPTNAME, KSIM_A_OPTVAL):
            if needed not in attrs:
                raise genl.NetlinkError(-errno.EINVAL, f"attribute {needed} missing")
        fd = genl.get_s32(attrs[KSIM_A_SOCKFD][0])
        try:
            dup = proc.get_peer_fd(pid, fd)
        except OSError as exc:
            raise genl.NetlinkError(-errno.EBADF, f"fd {fd}") from exc
        try:
            sock = socket.socket(fileno=dup)
        except OSError as exc:
            os.close(dup)
            raise genl.NetlinkError(-(exc.errno or errno.ENOTSOCK), f"fd {fd}") from None
        try:
            self._apply_sockopt(sock, attrs)
        except OSError as exc:
            raise genl.NetlinkError(-(exc.errno or errno.EIO), str(exc)) from None
        finally:
            sock.detach()
            os.close(dup)

    def _apply_sockopt(self, dup: socket.socket, attrs: dict[int, list[bytes]]) -> None:
        cookie = sock_cookie(dup)
        target = self._sockets.get(cookie)
        level = genl.get_u32(attrs[KSIM_A_LEVEL][0])
        optname = genl.get_u32(attrs[KSIM_A_OPTNAME][0])
        if target is None and (level, optname) == (socket.SOL_TCP, TCP_ULP):
            # on Linux any established TCP socket takes the ULP: one this model was not
            # told of (Kernel.adopt) is adopted now, through a copy it holds until release
            target = socket.socket(fileno=os.dup(dup.fileno()))
            self._sockets[cookie] = target
            self.adopted_on_ulp.append(cookie)
        if target is None:
            raise OSError(errno.EBADF, "socket unknown to kernel-sim (no handshake on it)")
        self.netns_of(target).ulp.setsockopt(target, level, optname, attrs[KSIM_A_OPTVAL][0])

    def _reply(self, agent: AgentSock, data: bytes, fds: list[int] | None = None) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        with agent.send_lock, contextlib.suppress(OSError):
            agent.conn.sendmsg([data], anc)

    # --- tracing ------------------------------------------------------------------

    def _trace(self, ns: NetNS | None, event: str, sock: int | None, info: dict[str, Any]) -> None:
        self.trace.append(TraceEvent(time.monotonic(), event, ns.name if ns else None, sock, info))

    def _trace_req(self, event: str, req: HandshakeReq | None, info: dict[str, Any]) -> None:
        ns = next((n for n in self._all_netns() if req and n.hn is req.net), None)
        self._trace(ns, event, req.sock_key if req else None, info)

    def events(self, name: str) -> list[TraceEvent]:
        return [e for e in list(self.trace) if e.event == name]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.01)
        return predicate()


def _sender_pid(anc: list[tuple[int, int, bytes]]) -> int:
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            return int(struct.unpack("=iII", data[:12])[0])
    return 0


def _cookie_of_fd(fd: int) -> bytes:
    sock = socket.socket(fileno=fd)
    try:
        return sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8)
    finally:
        sock.detach()
