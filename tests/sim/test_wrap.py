"""``tlshd wrap`` through kernel-sim (issue 17, item 3): an unmodified program's connect()
and accept() under seccomp user notification, on this host's own kernel. The handshake is
the agent's; kernel-sim plays the kernel for the program's socket (adopted at TCP_ULP), so
the test reads and writes through kernel-sim's record layer on that very socket (by its
SO_COOKIE) to show the keys the program's socket got are the session's. The program itself
moves data over real kTLS in the real-kernel tier (app_wrap)."""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from kernel_sim.kernel import Kernel
from tests.pki import PKI
from tests.sim.harness import Agent, unique_endpoint
from tests.sim.test_app import app_agent
from tlshd.agent.control import query_status
from tlshd.agent.stats import format_status

pytestmark = pytest.mark.sim

SO_COOKIE = 57
REPO = Path(__file__).resolve().parents[2]

CLIENT = """
import os, select, socket, sys
host, port, blocking = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "blocking"
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
s.setblocking(blocking)
try:
    s.connect((host, port))
except BlockingIOError:
    select.select([], [s], [])
    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        print("errno", err, flush=True); sys.exit(0)
except OSError as e:
    print("errno", e.errno, flush=True); sys.exit(0)
print("cookie", int.from_bytes(s.getsockopt(socket.SOL_SOCKET, 57, 8), "little"),
      "nonblocking", s.getblocking() is False, "pid", os.getpid(), flush=True)
sys.stdin.readline()
"""

SERVER = """
import socket, sys
listener = socket.create_server(("127.0.0.1", 0))
print("port", listener.getsockname()[1], flush=True)
for _ in range(int(sys.argv[1])):
    conn, peer = listener.accept()
    print("peer", peer[1], "cookie",
          int.from_bytes(conn.getsockopt(socket.SOL_SOCKET, 57, 8), "little"), flush=True)
sys.stdin.readline()
"""


class Wrapped:
    """``tlshd wrap -- python3 -c SCRIPT ARGS``, its stdout read line by line."""

    def __init__(self, endpoint: str, script: str, *args: str, wrap: tuple[str, ...] = ()
                 ) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tlshd", "wrap", "--verbose", "--endpoint", endpoint,
             "--timeout-ms", "5000", *wrap, "--", sys.executable, "-c", script, *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=REPO)

    def line(self) -> list[str]:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().split()

    def finish(self) -> tuple[int, str]:
        _, err = self.proc.communicate("\n", timeout=30)
        return self.proc.returncode, err


def _server_context(pki: PKI, *, tls12: bool = False, untrusted: bool = False
                    ) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if tls12:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    leaf = pki.untrusted_server if untrusted else pki.server
    context.load_cert_chain(leaf.cert, leaf.key)
    context.load_verify_locations(pki.ca)
    context.verify_mode = ssl.CERT_OPTIONAL
    return context


@contextmanager
def tls_server(behave: Callable[[socket.socket], None], family: int = socket.AF_INET
               ) -> Iterator[tuple[str, int, threading.Thread]]:
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    listener = socket.create_server((host, 0), family=family)
    thread = threading.Thread(target=lambda: behave(listener.accept()[0]), daemon=True)
    thread.start()
    with listener:
        yield host, listener.getsockname()[1], thread


def _ktls(kernel: Kernel, cookie: str) -> object:
    return kernel.ktls(kernel.socket_of(int(cookie)))


def _wrapped_agent(kernel: Kernel, pki: PKI, tmp_path: Path, allow: str = "root"
                   ) -> tuple[Agent, str]:
    kernel.add_netns(None)
    return app_agent(kernel, pki, tmp_path, allow=allow)


@pytest.mark.parametrize(("family", "blocking"), [
    (socket.AF_INET, "blocking"), (socket.AF_INET, "nonblocking"),
    (socket.AF_INET6, "nonblocking")], ids=["ipv4", "ipv4-nonblocking", "ipv6-nonblocking"])
def test_connect_returns_after_the_handshake_with_the_sessions_keys_on_the_programs_socket(
        pki: PKI, tmp_path: Path, family: int, blocking: str) -> None:
    box: dict[str, object] = {}

    def serve(conn: socket.socket) -> None:
        with _server_context(pki).wrap_socket(conn, server_side=True) as tls:
            box["client"] = tls.getpeercert()
            box["got"] = tls.recv(100)
            tls.sendall(b"pong")

    with Kernel(endpoint=unique_endpoint()) as kernel:
        agent, endpoint = _wrapped_agent(kernel, pki, tmp_path)
        try:
            with tls_server(serve, family) as (host, port, thread):
                program = Wrapped(endpoint, CLIENT, host, str(port), blocking,
                                  wrap=("--server-name", "localhost"))
                word, cookie, _, nonblocking, _, pid = program.line()
                assert word == "cookie", program.finish()
                assert nonblocking == str(blocking == "nonblocking")  # its flags as they were
                ktls = _ktls(kernel, cookie)
                ktls.sendmsg(b"ping")  # type: ignore[attr-defined]
                # the program's socket stays non-blocking, and so is the model's copy
                select.select([kernel.socket_of(int(cookie))], [], [], 10)
                assert ktls.recvmsg(100) == (23, b"pong")  # type: ignore[attr-defined]
                thread.join(10)
                code, err = program.finish()
            assert box["got"] == b"ping"
            assert box["client"], "the agent's client certificate"
            assert code == 0, err
            assert f"connect to {host} port {port}: TLS, peer CN=server.test" in err
            assert any("application request: client for pid" in line and "(sent by pid" in line
                       for line in agent.log)
            # per connection, as AT-TLS shows one: the log line and tlshd status
            exe = os.path.realpath(sys.executable)
            line = next(x for x in agent.log if "application connection:" in x)
            assert f"role=client rule=- pid={pid} exe={exe!r} " \
                "peer='CN=server.test,O=tlshd tests' cipher=" in line, line
            assert line.endswith(" status=0")
            doc = query_status(f"\0tlshd-test/{kernel.endpoint}".encode())
            apps = doc["applications"]
            assert apps["connections"] == [
                {"rule": "-", "role": "client", "result": "ok", "count": 1}]
            (recent,) = apps["recent"]
            assert recent["executable"] == exe and recent["status"] == "OK"
            assert recent["peer"] == "CN=server.test,O=tlshd tests"
            assert recent["app_pid"] == int(pid)  # the program, not tlshd wrap
            assert "applications (rule, role, result):" in format_status(doc)
        finally:
            assert agent.stop() == 0, "\n".join(agent.log)


def test_accept_returns_a_secured_connection_and_a_hostile_peer_never_reaches_the_program(
        pki: PKI, tmp_path: Path) -> None:
    context = ssl.create_default_context(cafile=str(pki.ca))
    with Kernel(endpoint=unique_endpoint()) as kernel:
        agent, endpoint = _wrapped_agent(kernel, pki, tmp_path)
        try:
            program = Wrapped(endpoint, SERVER, "1")
            word, port = program.line()
            assert word == "port", program.finish()
            with socket.create_connection(("127.0.0.1", int(port))) as hostile:
                hostile.sendall(b"GET / HTTP/1.0\r\n\r\n")  # no TLS: dropped
                hostile.settimeout(10)
                with contextlib.suppress(ConnectionResetError):  # closed, or reset
                    while hostile.recv(100):  # perhaps an alert first
                        pass
            raw = socket.create_connection(("127.0.0.1", int(port)))
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                word, peer, _, cookie = program.line()
                assert word == "peer" and int(peer) == tls.getsockname()[1]
                assert tls.getpeercert()["subject"][-1] == (("commonName", "server.test"),)
                tls.sendall(b"ping")
                ktls = _ktls(kernel, cookie)
                assert ktls.recvmsg(100) == (23, b"ping")  # type: ignore[attr-defined]
                ktls.sendmsg(b"pong")  # type: ignore[attr-defined]
                assert tls.recv(100) == b"pong"
            code, err = program.finish()
            assert code == 0, err
            assert "dropped" in err and "accept from 127.0.0.1" in err
        finally:
            assert agent.stop() == 0, "\n".join(agent.log)


@pytest.mark.parametrize(("case", "expected"), [
    ("untrusted", errno.EACCES), ("tls12", errno.EACCES), ("closes", errno.ETIMEDOUT)])
def test_a_wrong_peer_fails_connect_with_its_errno_and_the_agent_serves_on(
        pki: PKI, tmp_path: Path, case: str, expected: int) -> None:
    def serve(conn: socket.socket) -> None:
        with conn:
            if case == "closes":
                conn.recv(5)
                return
            context = _server_context(pki, tls12=case == "tls12", untrusted=case == "untrusted")
            with contextlib.suppress(ssl.SSLError, OSError):
                context.wrap_socket(conn, server_side=True).close()

    with Kernel(endpoint=unique_endpoint()) as kernel:
        agent, endpoint = _wrapped_agent(kernel, pki, tmp_path)
        try:
            with tls_server(serve) as (host, port, _):
                program = Wrapped(endpoint, CLIENT, host, str(port), "blocking",
                                  wrap=("--server-name", "localhost"))
                assert program.line() == ["errno", str(expected)], program.finish()
                code, err = program.finish()
            assert code == 0 and "failed" in err, err
            _a_good_connect(kernel, pki, endpoint)  # and the agent serves on
        finally:
            assert agent.stop() == 0, "\n".join(agent.log)


def _a_good_connect(kernel: Kernel, pki: PKI, endpoint: str) -> None:
    def serve(conn: socket.socket) -> None:
        with _server_context(pki).wrap_socket(conn, server_side=True) as tls:
            tls.recv(1)

    with tls_server(serve) as (host, port, _):
        program = Wrapped(endpoint, CLIENT, host, str(port), "blocking",
                          wrap=("--server-name", "localhost"))
        word, cookie, *_ = program.line()
        assert word == "cookie", program.finish()
        _ktls(kernel, cookie).sendmsg(b"x")  # type: ignore[attr-defined]
        assert program.finish()[0] == 0


def test_a_uid_the_agent_does_not_allow_gets_eacces_and_the_peer_sees_no_handshake(
        pki: PKI, tmp_path: Path) -> None:
    seen: list[bytes] = []

    def serve(conn: socket.socket) -> None:
        with conn:
            seen.append(conn.recv(100))

    with Kernel(endpoint=unique_endpoint()) as kernel:
        agent, endpoint = _wrapped_agent(kernel, pki, tmp_path, allow="nobody")
        try:
            with tls_server(serve) as (host, port, thread):
                program = Wrapped(endpoint, CLIENT, host, str(port), "blocking")
                assert program.line() == ["errno", str(errno.EACCES)], program.finish()
                thread.join(10)
                assert program.finish()[0] == 0
            assert seen == [b""]  # shut down before a byte of TLS
            assert not any("role=client" in line for line in agent.log)
        finally:
            assert agent.stop() == 0, "\n".join(agent.log)


def test_the_wrap_policy_leaves_connections_in_plain_and_the_exit_status_is_the_programs(
        tmp_path: Path) -> None:
    policy = tmp_path / "wrap.yml"
    policy.write_text("rules:\n  plain:\n    match: {direction: any}\n    action: {tls: false}\n")
    script = ("import socket, sys\n"
              "l = socket.create_server(('127.0.0.1', 0))\n"
              "c = socket.create_connection(l.getsockname())\n"
              "a, _ = l.accept(); c.sendall(b'plain'); print(a.recv(10).decode())\n"
              "sys.exit(7)\n")
    done = subprocess.run(
        [sys.executable, "-m", "tlshd", "wrap", "--policy", str(policy), "--endpoint",
         f"tlshd-test-app/none-{os.getpid()}", "--", sys.executable, "-c", script],
        capture_output=True, text=True, timeout=60, cwd=REPO, check=False)
    assert (done.returncode, done.stdout) == (7, "plain\n"), done.stderr


def test_without_an_agent_a_secured_connect_fails_with_econnrefused_and_bad_uses_exit() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        done = subprocess.run(
            [sys.executable, "-m", "tlshd", "wrap", "--endpoint",
             f"tlshd-test-app/none-{os.getpid()}", "--", sys.executable, "-c", CLIENT,
             "127.0.0.1", str(listener.getsockname()[1]), "blocking"],
            capture_output=True, text=True, timeout=60, cwd=REPO, check=False, input="\n")
    assert done.stdout.split() == ["errno", str(errno.ECONNREFUSED)], done.stderr
    missing = subprocess.run([sys.executable, "-m", "tlshd", "wrap", "--", "/nonexistent/x"],
                             capture_output=True, text=True, timeout=60, cwd=REPO, check=False)
    assert missing.returncode == 127 and "/nonexistent/x" in missing.stderr
    bad = tmp_policy_problem()
    assert bad.returncode == 2 and "wrap.yml" in bad.stderr, bad.stderr


def tmp_policy_problem() -> subprocess.CompletedProcess[str]:
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        policy = Path(directory) / "wrap.yml"
        policy.write_text("rules:\n  r:\n    match: {bogus: 1}\n")
        return subprocess.run([sys.executable, "-m", "tlshd", "wrap", "--policy", str(policy),
                               "--", "true"], capture_output=True, text=True, timeout=60,
                              cwd=REPO, check=False)


CONCURRENT = """
import socket, sys, threading
port, count = int(sys.argv[1]), int(sys.argv[2])
cookies, barrier = [], threading.Barrier(count)
def one():
    s = socket.socket()
    barrier.wait()  # every connect() at once
    s.connect(("127.0.0.1", port))
    cookies.append(int.from_bytes(s.getsockopt(socket.SOL_SOCKET, 57, 8), "little"))
threads = [threading.Thread(target=one) for _ in range(count)]
for t in threads: t.start()
for t in threads: t.join()
print(*cookies, flush=True)
sys.stdin.readline()
"""


def test_several_connects_at_once_from_one_program_are_each_secured(
        pki: PKI, tmp_path: Path) -> None:
    count = 4
    served: list[bytes] = []
    context = _server_context(pki)
    listener = socket.create_server(("127.0.0.1", 0))

    def one(conn: socket.socket) -> None:
        with context.wrap_socket(conn, server_side=True) as tls:
            served.append(tls.recv(100))

    def serve() -> None:
        for _ in range(count):
            threading.Thread(target=one, args=(listener.accept()[0],), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    with Kernel(endpoint=unique_endpoint()) as kernel, listener:
        agent, endpoint = _wrapped_agent(kernel, pki, tmp_path)
        try:
            program = Wrapped(endpoint, CONCURRENT, str(listener.getsockname()[1]), str(count),
                              wrap=("--server-name", "localhost"))
            cookies = program.line()
            assert len(set(cookies)) == count, program.finish()
            for n, cookie in enumerate(cookies):
                _ktls(kernel, cookie).sendmsg(f"conn {n}".encode())  # type: ignore[attr-defined]
            deadline = time.monotonic() + 10
            while len(served) < count and time.monotonic() < deadline:
                time.sleep(0.05)
            assert sorted(served) == [f"conn {n}".encode() for n in range(count)]
            code, err = program.finish()
            assert code == 0 and err.count(": TLS, peer CN=server.test") == count, err
        finally:
            assert agent.stop() == 0, "\n".join(agent.log)


ACCEPT4 = """
import ctypes, errno, fcntl, os, select, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
listener = socket.create_server(("127.0.0.1", 0))
listener.setblocking(False)
first = libc.accept4(listener.fileno(), None, None, socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
print("port", listener.getsockname()[1], "empty", errno.errorcode[ctypes.get_errno()]
      if first < 0 else first, flush=True)
select.select([listener], [], [])
fd = libc.accept4(listener.fileno(), None, None, socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
conn = socket.socket(fileno=fd)
print("nonblocking", bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK),
      "cloexec", bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC),
      "cookie", int.from_bytes(conn.getsockopt(socket.SOL_SOCKET, 57, 8), "little"), flush=True)
sys.stdin.readline()
"""


def test_accept4_on_a_nonblocking_listener_gives_eagain_then_its_flags(
        pki: PKI, tmp_path: Path) -> None:
    context = ssl.create_default_context(cafile=str(pki.ca))
    with Kernel(endpoint=unique_endpoint()) as kernel:
        agent, endpoint = _wrapped_agent(kernel, pki, tmp_path)
        try:
            program = Wrapped(endpoint, ACCEPT4)
            word, port, _, empty = program.line()
            assert (word, empty) == ("port", "EAGAIN"), program.finish()
            raw = socket.create_connection(("127.0.0.1", int(port)))
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                _, nonblocking, _, cloexec, _, cookie = program.line()
                assert (nonblocking, cloexec) == ("True", "True")
                _ktls(kernel, cookie).sendmsg(b"hi")  # type: ignore[attr-defined]
                assert tls.recv(10) == b"hi"
            assert program.finish()[0] == 0
        finally:
            assert agent.stop() == 0, "\n".join(agent.log)
