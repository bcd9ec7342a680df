"""How much of a handshake's CPU is Python moving bytes, measured in one run (issue 16, item 3).

    .venv/bin/python bench/native_path.py [--pairs N] [--rounds R] [--groups LIST]

The same TLS 1.3 x509 handshakes (the agent's contexts: tlshd.credentials.contexts, demo
certificates), both ends in this one process, one event loop, three ways:

* ``engine``: the agent's design. A ``HandshakeEngine`` per end (memory BIOs, the engine's
  record framing, keylog secrets) and Python's recv/send on a non-blocking loopback TCP pair,
  as a worker drives it.
* ``fd``: the prototype. OpenSSL on the socket itself (``SSL.Connection(ctx, sock)``: a socket
  BIO, no framing and no copies in Python); Python only calls ``do_handshake`` when the socket
  is ready. It ends with what the engine ends with: the traffic secrets from the key-log
  callback, the peer's certificate and chain in DER, the cipher and group, and the client
  checks the server's name inside OpenSSL's verification as the engine does.
* ``memory``: the ceiling. Both ends over memory BIOs, no socket at all.

Rounds alternate the three; each prints CPU per handshake side (process CPU over 2 x N), and
the medians go out as ``key=value``: ``cpu_ms_{engine,fd,memory}``, ``python_bytes_ms``
(engine - fd: what the byte loop in Python costs), ``socket_ms`` (fd - memory: the kernel's
part), ``fd_gain`` (engine / fd).
"""

from __future__ import annotations

import argparse
import contextlib
import selectors
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from OpenSSL import SSL

from bench.bench import _memory_pair, _reply, print_figures, ratio
from kernel_sim.demo import write_demo_config, write_demo_pki
from tlshd.config import parse_config
from tlshd.credentials.contexts import Contexts
from tlshd.handshake import _openssl
from tlshd.handshake.engine import (
    HandshakeEngine,
    _expect_peername,
    _peer_certificates,
)
from tlshd.handshake.events import HandshakeComplete, NeedData
from tlshd.handshake.secrets import Role, SecretCollector
from tlshd.netlink.spec import MsgType


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    for sock in (client, server):
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return client, server


def engine_pair(client_ctx: SSL.Context, server_ctx: SSL.Context) -> None:
    """As a worker: bytes in Python, each end's engine fed what its socket had."""
    socks = tcp_pair()
    engines = (HandshakeEngine(client_ctx, Role.CLIENT, peername="localhost"),
               HandshakeEngine(server_ctx, Role.SERVER))
    sel = selectors.DefaultSelector()
    for i, sock in enumerate(socks):
        sel.register(sock, selectors.EVENT_READ, i)
    for i in (0, 1):
        socks[i].sendall(engines[i].data_to_send())
    try:
        while not all(isinstance(e.next_event(), HandshakeComplete) for e in engines):
            for key, _ in sel.select(1.0):
                engine, sock = engines[key.data], socks[key.data]
                event = engine.next_event()
                if not isinstance(event, NeedData):
                    continue
                with contextlib.suppress(BlockingIOError):
                    engine.receive_data(sock.recv(event.max_bytes))
                out = engine.data_to_send()
                if out:
                    sock.sendall(out)
            for engine in engines:
                event = engine.next_event()
                if not isinstance(event, NeedData | HandshakeComplete):
                    raise RuntimeError(f"engine handshake failed: {event}")
    finally:
        sel.close()
        for sock in socks:
            sock.close()


def _collect(conn: SSL.Connection, line: bytes) -> None:
    collector = conn.get_app_data()
    if isinstance(collector, SecretCollector):
        collector.add_line(line)


def fd_pair(client_ctx: SSL.Context, server_ctx: SSL.Context) -> None:
    """OpenSSL reads and writes the sockets; Python waits for readiness only."""
    socks = tcp_pair()
    conns = (SSL.Connection(client_ctx, socks[0]), SSL.Connection(server_ctx, socks[1]))
    for conn in conns:
        conn.set_app_data(SecretCollector())
    _expect_peername(conns[0], "localhost")
    conns[0].set_connect_state()
    conns[1].set_accept_state()
    done = [False, False]
    sel = selectors.DefaultSelector()
    for i, sock in enumerate(socks):
        sel.register(sock, selectors.EVENT_READ, i)
    try:
        for i in (0, 1):
            _step(conns[i], done, i)
        while not all(done):
            for key, _ in sel.select(1.0):
                _step(conns[key.data], done, key.data)
        for conn, role in zip(conns, (Role.CLIENT, Role.SERVER), strict=True):
            conn.get_app_data().application_secrets(role)
            _peer_certificates(conn)
            conn.get_cipher_name()
            _openssl.group_name(conn)
            conn.set_app_data(None)
    finally:
        sel.close()
        for sock in socks:
            sock.close()


def _step(conn: SSL.Connection, done: list[bool], i: int) -> None:
    if done[i]:
        return
    try:
        conn.do_handshake()
        done[i] = True
    except SSL.WantReadError:
        pass


def one_round(kind: str, pairs: int, contexts: dict[str, tuple[SSL.Context, SSL.Context]]
              ) -> float:
    fn = {"engine": engine_pair, "fd": fd_pair, "memory": _memory_pair}[kind]
    client_ctx, server_ctx = contexts["fd" if kind == "fd" else "engine"]
    fn(client_ctx, server_ctx)  # warm
    begun = time.process_time()
    for _ in range(pairs):
        fn(client_ctx, server_ctx)
    return 1000 * (time.process_time() - begun) / (2 * pairs)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--groups", default="", help="[authenticate] groups")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        text = write_demo_config(directory, write_demo_pki(directory), "native").read_text()
        if args.groups:
            text += f"\n[authenticate]\ngroups={args.groups}\n"
        contexts = {}
        for mode in ("engine", "fd"):  # the same configuration, built twice
            built = Contexts.from_config(parse_config(text))
            contexts[mode] = (built(_reply(MsgType.CLIENTHELLO)),
                              built(_reply(MsgType.SERVERHELLO)))
        for ctx in contexts["fd"]:
            ctx.set_keylog_callback(_collect)  # the secrets to a collector, not an engine
        results: dict[str, list[float]] = {"engine": [], "fd": [], "memory": []}
        for r in range(args.rounds):
            for kind, values in results.items():
                values.append(one_round(kind, args.pairs, contexts))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.3f} ms" for k, v in
                                                 results.items()))
    figures = {f"cpu_ms_{kind}": statistics.median(v) for kind, v in results.items()}
    figures["python_bytes_ms"] = figures["cpu_ms_engine"] - figures["cpu_ms_fd"]
    figures["socket_ms"] = figures["cpu_ms_fd"] - figures["cpu_ms_memory"]
    figures["fd_gain"] = ratio(figures["cpu_ms_engine"], figures["cpu_ms_fd"])
    print_figures(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
