"""Running the agent against kernel-sim, and independent TLS peers, for the sim tier.

The agent is always a separate process (``python -m tlshd``) on a kernel-sim
endpoint of its own; peers are ``openssl``/``gnutls`` processes or plain
sockets. Everything is bounded in time and cleaned up by the fixtures.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from kernel_sim.consumer import HandshakeOutcome, TLSConsumer
from kernel_sim.kernel import Kernel
from tests.pki import PKI

AGENT_START_TIMEOUT_S = 20.0


def unique_endpoint() -> str:
    return f"tlshd-test-{uuid.uuid4().hex[:10]}"


def write_config(directory: Path, pki: PKI, endpoint: str, *, require_client_cert: bool = False,
                 workers: int = 1, timeout_ms: int = 10_000, client_cert: bool = True,
                 keyrings: str = "", extra: str = "") -> Path:
    client = (f"x509.certificate={pki.client.cert}\nx509.private_key={pki.client.key}\n"
              if client_cert else "")
    text = (
        (f"[authenticate]\nkeyrings={keyrings}\n\n" if keyrings else "")
        + "[authenticate.client]\n"
        f"x509.truststore={pki.ca}\n{client}\n"
        "[authenticate.server]\n"
        f"x509.truststore={pki.ca}\n"
        f"x509.certificate={pki.server.cert}\nx509.private_key={pki.server.key}\n\n"
        "[agent]\n"
        f"workers={workers}\nupcall=kernel-sim:{endpoint}\n"
        # the tests read each request's failure line: none is folded into a summary
        f"control_socket=tlshd-test/{endpoint}\nfailure_log_burst=0\n{extra}"
        f"handshake_timeout_ms={timeout_ms}\n"
        f"require_client_cert={'true' if require_client_cert else 'false'}\n"
    )
    path = directory / f"config-{endpoint}"
    path.write_text(text)
    return path


class Agent:
    """The agent process; ``log`` is its stderr, one line an entry.

    The agent writes a request's log line before it sends DONE, so by the time a consumer
    has its status the line is in the pipe: ``log`` waits until the reader thread has taken
    everything the pipe holds, which makes ``agent.log[-1]`` that request's line.
    """

    def __init__(self, config: Path, netns: str | None = None, *,
                 wrap: tuple[str, ...] = ()) -> None:
        """``wrap``: a command the agent runs under (e.g. setpriv, to drop a capability)."""
        prefix = ["ip", "netns", "exec", netns] if netns else []
        prefix += wrap
        # Readiness the way systemd sees it: READY=1 on a notification socket.
        # A path, not an abstract name: those are per network namespace. A test that
        # listens on NOTIFY_SOCKET itself keeps it (and does its own waiting for READY=1).
        env = dict(os.environ)
        self._notify: socket.socket | None = None
        if "NOTIFY_SOCKET" not in env:
            notify_dir = tempfile.mkdtemp(prefix="tlshd-notify-")
            self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._notify.bind(os.path.join(notify_dir, "notify"))
            env["NOTIFY_SOCKET"] = self._notify.getsockname()
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "tlshd", "-s", "-c", str(config)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=env,
        )
        self._lines: list[str] = []
        self._partial = b""
        self._lock = threading.Lock()
        self._busy = threading.Event()  # set while a chunk is read but not yet appended
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        while True:
            try:
                select.select([fd], [], [])
                self._busy.set()
                chunk = os.read(fd, 65536)
            except (OSError, ValueError):  # the pipe was closed under us: the agent is gone
                self._busy.clear()
                return
            with self._lock:
                *lines, self._partial = (self._partial + chunk).split(b"\n")
                self._lines += [line.decode(errors="replace").rstrip() for line in lines]
            self._busy.clear()
            if not chunk:
                return

    @property
    def log(self) -> list[str]:
        assert self.proc.stderr is not None
        fd, deadline = self.proc.stderr.fileno(), time.monotonic() + 2.0
        while time.monotonic() < deadline:
            pending = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]
            if pending == 0 and not self._busy.is_set():
                break
            time.sleep(0.002)
        with self._lock:
            return list(self._lines)

    def wait_ready(self, timeout: float) -> bool:
        """True once the agent sent READY=1 (every worker has its upcall open)."""
        if self._notify is None:
            return True  # the test itself listens for READY=1
        self._notify.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                message = self._notify.recv(4096)
            except TimeoutError:
                return False
            if b"READY=1" in message.split(b"\n"):
                return True
            self._notify.settimeout(max(0.01, deadline - time.monotonic()))
        return False

    def worker_pids(self) -> list[int]:
        """The supervisor's descendants: its workers and, with privilege separation, their
        handshake processes (``ip netns exec`` execs, so the pid is the supervisor's)."""
        return descendants(self.proc.pid)

    def handshake_pids(self) -> list[int]:
        """The processes that run handshakes: with privilege separation, the workers'
        children; else the workers."""
        workers = _children(self.proc.pid)
        inner = [pid for worker in workers for pid in _children(worker)]
        return inner or workers

    def open_fds(self) -> int:
        return sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in self.worker_pids())

    def settled_fds(self, timeout: float = 5.0) -> int:
        """The workers' fd count once it stops changing (start-up is over)."""
        deadline, last = time.monotonic() + timeout, self.open_fds()
        while time.monotonic() < deadline:
            time.sleep(0.2)
            now = self.open_fds()
            if now == last:
                return now
            last = now
        return last

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def start_agent(kernel: Kernel, config: Path, netns: str | None = None, *,
                workers: int = 1) -> Agent:
    """Start the agent and wait until ``workers`` of its processes joined the tlshd group."""
    agent = Agent(config, netns)
    ns = kernel.netns_of(_probe_socket(netns))
    ready = agent.wait_ready(AGENT_START_TIMEOUT_S)
    if not ready or not kernel.wait_for(lambda: kernel.listeners(ns) >= workers, 5):
        agent.stop()
        raise RuntimeError("agent did not join the tlshd group:\n" + "\n".join(agent.log))
    return agent


def _probe_socket(netns: str | None) -> socket.socket:
    from kernel_sim.netns import socket_in_netns

    return socket_in_netns(netns)


@contextlib.contextmanager
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected loopback TCP pair (client, server side)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    try:
        yield client, server
    finally:
        client.close()
        server.close()


def _ephemeral_range() -> range:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return range(int(low), int(high) + 1)
    except (OSError, ValueError):
        return range(32768, 61000)


def pair(kernel: Kernel) -> tuple[int, int]:
    """One agent-client / agent-server x509 handshake pair; returns both statuses."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    box: dict[str, int] = {}
    thread = threading.Thread(target=lambda: box.update(
        s=TLSConsumer(kernel).server(server).status))
    thread.start()
    status = TLSConsumer(kernel).client(client, peername="localhost").status
    thread.join(20)
    kernel.sock_release(client)
    kernel.sock_release(server)
    return status, box.get("s", -1)


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def descendants(pid: int) -> list[int]:
    out = []
    for child in _children(pid):
        out += [child, *descendants(child)]
    return out


def free_port() -> int:
    """A port nothing listens on, outside the ephemeral range: an outgoing connection
    elsewhere in the run cannot take it before the peer binds it (gnutls-serv then
    listens on IPv6 only and 127.0.0.1 never answers)."""
    ephemeral = _ephemeral_range()
    for _ in range(200):
        port = random.randrange(20000, 65535)
        if port in ephemeral:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0,
              proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until something accepts on 127.0.0.1:port; give up early if `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        if proc is not None and proc.poll() is not None:
            raise PeerExitedError(f"the peer exited ({proc.returncode}) before port {port}")
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


class PeerExitedError(OSError):
    """A peer server process ended before it listened (its port was taken, for example)."""


@dataclass
class Peer:
    """An independent TLS peer process with piped stdin/stdout."""

    proc: subprocess.Popen[bytes]

    def write(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def read_until(self, needle: bytes, timeout: float = 10.0) -> bytes:
        assert self.proc.stdout is not None
        fd, out = self.proc.stdout.fileno(), b""
        deadline = time.monotonic() + timeout
        while needle not in out and time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                out += chunk
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def start_peer(argv: list[str], port: int | None = None) -> Peer:
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    peer = Peer(proc)
    if port is not None:
        try:
            wait_port(port, proc=proc)
        except (TimeoutError, PeerExitedError) as exc:
            output = peer.read_until(b"\0", timeout=0.2) if proc.poll() is not None else b""
            peer.close()
            raise type(exc)(f"{exc}: {argv[0]} said {output[-400:]!r}") from None
    return peer


def start_server(argv_for: Callable[[int], list[str]], attempts: int = 3) -> tuple[Peer, int]:
    """Start a peer server on a free port; another port is tried when the chosen one
    was taken between free_port() and the peer's bind (the peer exits at once)."""
    for attempt in range(attempts):
        port = free_port()
        try:
            return start_peer(argv_for(port), port), port
        except (PeerExitedError, TimeoutError):
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def recv_app_data(consumer: TLSConsumer, size: int, timeout: float = 10.0) -> tuple[bytes, int]:
    """Application data from the kTLS socket; counts (and skips) handshake records
    such as NewSessionTicket, as the NFS client does."""
    assert consumer.ktls is not None
    consumer.ktls.sock.settimeout(timeout)
    data, skipped = b"", 0
    while len(data) < size:
        rtype, chunk = consumer.ktls.recvmsg(16384)
        if rtype == 22:
            skipped += 1
            continue
        if rtype != 23 or not chunk:
            raise AssertionError(f"record type {rtype}, {chunk!r} after {data!r}")
        data += chunk
    return data, skipped


def client_handshake(kernel: Kernel, port: int, peername: str = "localhost", *,
                     auth: str = "x509", timeout_ms: int = 0,
                     timeout_s: float = 10.0) -> tuple[TLSConsumer, HandshakeOutcome,
                                                       socket.socket]:
    sock = socket.create_connection(("127.0.0.1", port))
    consumer = TLSConsumer(kernel, timeout_s=timeout_s, timeout_ms=timeout_ms)
    return consumer, consumer.client(sock, peername=peername, auth=auth), sock
