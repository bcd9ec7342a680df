"""Many handshakes at once across network namespaces, one agent per namespace, with a
stalled peer among them: everything else completes, nothing leaks."""

from __future__ import annotations

import errno
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator

import pytest

from kernel_sim.consumer import HandshakeOutcome, TLSConsumer
from kernel_sim.kernel import Kernel
from kernel_sim.netns import run_in_netns, socket_in_netns
from tests.sim.harness import Agent, start_agent, unique_endpoint, write_config

pytestmark = [pytest.mark.sim, pytest.mark.netns]

NAMESPACES = 4
PAIRS_PER_NS = 25  # 2 requests per pair: 50 per namespace, the kernel's pending cap here


@pytest.fixture
def namespaces() -> Iterator[list[str]]:
    names = [f"tlshd-t{uuid.uuid4().hex[:8]}" for _ in range(NAMESPACES)]
    for name in names:
        subprocess.run(["ip", "netns", "add", name], check=True)
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    yield names
    for name in names:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _listener(ns: str) -> socket.socket:
    def make() -> socket.socket:
        return socket.create_server(("127.0.0.1", 0), backlog=128)

    return run_in_netns(ns, make)


def _connect(ns: str, address: tuple[str, int]) -> socket.socket:
    sock = socket_in_netns(ns)
    sock.connect(address)
    return sock


def _pair(kernel: Kernel, ns: str, results: list[tuple[str, HandshakeOutcome]]) -> None:
    with _listener(ns) as listener:
        client = _connect(ns, listener.getsockname())
        server, _ = listener.accept()
    server_side: dict[str, HandshakeOutcome] = {}
    thread = threading.Thread(target=lambda: server_side.update(
        out=TLSConsumer(kernel, timeout_s=20).server(server)))
    thread.start()
    results.append(("client", TLSConsumer(kernel).client(client, peername="localhost")))
    thread.join(30)
    results.append(("server", server_side["out"]))
    kernel.sock_release(client)
    kernel.sock_release(server)


def test_200_requests_across_4_namespaces_with_stalled_peers(namespaces, pki, tmp_path):
    """198 requests in 99 client/server pairs, plus, in the first namespace, a client request
    whose server never answers and a server request whose client never speaks."""
    with Kernel(endpoint=unique_endpoint()) as kernel:
        agents: list[Agent] = []
        try:
            for ns in namespaces:
                kernel.add_netns(ns)
                config = write_config(tmp_path, pki, kernel.endpoint, workers=2)
                agents.append(start_agent(kernel, config, netns=ns, workers=2))
            baseline = [agent.settled_fds() for agent in agents]

            stalled_listener = _listener(namespaces[0])
            stalled_client = _connect(namespaces[0], stalled_listener.getsockname())
            silent_server, _ = stalled_listener.accept()  # a plain socket: never answers
            silent_client = _connect(namespaces[0], stalled_listener.getsockname())
            stalled_server, _ = stalled_listener.accept()  # its peer never speaks
            stalled: dict[str, HandshakeOutcome] = {}
            stalls = [
                threading.Thread(target=lambda: stalled.update(client=TLSConsumer(
                    kernel, timeout_ms=4000).client(stalled_client, peername="localhost"))),
                threading.Thread(target=lambda: stalled.update(server=TLSConsumer(
                    kernel, timeout_ms=4000).server(stalled_server))),
            ]

            results: list[tuple[str, HandshakeOutcome]] = []
            pairs = [threading.Thread(target=_pair, args=(kernel, ns, results))
                     for ns in namespaces
                     for _ in range(PAIRS_PER_NS - (1 if ns == namespaces[0] else 0))]
            for thread in [*stalls, *pairs]:
                thread.start()
            for thread in pairs:
                thread.join(60)
            for thread in stalls:
                thread.join(15)

            assert len(results) == 2 * len(pairs) == 198
            failures = [(role, out.status) for role, out in results if out.status != 0]
            assert failures == []
            assert stalled["client"].status == -errno.ETIMEDOUT
            assert stalled["server"].status == -errno.ETIMEDOUT
            kernel.sock_release(stalled_client)
            kernel.sock_release(stalled_server)
            for sock in (silent_server, silent_client, stalled_listener):
                sock.close()
            assert [agent.settled_fds() for agent in agents] == baseline  # no fd left open
            completes = kernel.events("complete")
            assert len(completes) == 200
        finally:
            for agent in agents:
                assert agent.stop() == 0, "\n".join(agent.log[-5:])
