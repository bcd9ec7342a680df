"""Start-up as the kernel sees it: a listener within milliseconds of exec, requests that
arrive while the agent loads wait instead of failing, a failed start leaves no listener.

kernel-sim refuses a submit with ESRCH while nobody in the namespace has joined the ``tlshd``
group, as Linux does (net/handshake/netlink.c: handshake_genl_notify), so each of these can
fail: without tlshd/early.py the first test's requests get ESRCH.
"""

from __future__ import annotations

import errno
import socket
import threading
import time

import pytest

from kernel_sim.consumer import TLSConsumer
from kernel_sim.kernel import Kernel
from tests.sim.harness import Agent, unique_endpoint, write_config

pytestmark = pytest.mark.sim


def _connected_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return client, server


def test_a_request_submitted_while_the_agent_loads_waits_and_succeeds(pki, tmp_path):
    with Kernel(endpoint=unique_endpoint()) as kernel:
        ns = kernel.add_netns(None)
        config = write_config(tmp_path, pki, kernel.endpoint)
        started = time.monotonic()
        agent = Agent(config)
        try:
            assert kernel.wait_for(lambda: kernel.listeners(ns) > 0, 30)
            listening_s = time.monotonic() - started
            workers_then = agent.worker_pids()  # none yet: OpenSSL is still being imported
            client, server = _connected_pair()
            box: dict[str, int] = {}
            thread = threading.Thread(
                target=lambda: box.update(s=TLSConsumer(kernel).server(server).status))
            thread.start()
            status = TLSConsumer(kernel).client(client, peername="localhost").status
            thread.join(30)
            ready_s = time.monotonic() - started
            assert workers_then == [], "the request was not submitted during the load"
            assert (status, box["s"]) == (0, 0), agent.log[-5:]
            assert kernel.events("submit_err") == []
            # once the workers listen, the early membership is gone: one listener per worker
            assert agent.wait_ready(30)
            assert kernel.wait_for(lambda: kernel.listeners(ns) == 1, 5)
        finally:
            assert agent.stop() == 0
        kernel.sock_release(client)
        kernel.sock_release(server)
    assert listening_s < ready_s
    print(f"exec to listener {listening_s * 1000:.0f} ms, to both handshakes done "
          f"{ready_s * 1000:.0f} ms")


def test_a_failed_start_leaves_no_listener_behind(pki, tmp_path):
    with Kernel(endpoint=unique_endpoint()) as kernel:
        ns = kernel.add_netns(None)
        config = write_config(tmp_path, pki, kernel.endpoint)
        config.write_text(config.read_text() + "[agent]\nworkers=lots\n")  # refused at start
        agent = Agent(config)
        assert agent.proc.wait(60) == 1
        assert kernel.wait_for(lambda: kernel.listeners(ns) == 0, 5)
        client, _server = _connected_pair()
        begun = time.monotonic()
        outcome = TLSConsumer(kernel).client(client, peername="localhost")
        assert outcome.status == -errno.ESRCH
        assert time.monotonic() - begun < 1.0  # at once, not after a timeout
        kernel.sock_release(client)
