"""Hostile peers against the agent through kernel-sim: a slot-exhaustion attack."""

from __future__ import annotations

import errno
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kernel_sim.consumer import TLSConsumer
from kernel_sim.kernel import Kernel
from tests.pki import PKI
from tests.sim.harness import start_agent, write_config

pytestmark = pytest.mark.sim

SILENT = 100  # connections that make the server side submit, then say nothing
ATTACK_S = 8.0


def _tcp_pair(source: str = "127.0.0.1") -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), source_address=(source, 0))
        server, _ = listener.accept()
    return client, server


def _silent_peer(kernel: Kernel, source: str, stop: threading.Event, ended: list[int]) -> None:
    """Connect, let the server side ask for a handshake, say nothing; renew at once."""
    while not stop.is_set():
        client, server = _tcp_pair(source)
        out = TLSConsumer(kernel, timeout_s=20).server(server)
        if out.status in (-errno.EAGAIN, -errno.EBUSY):  # queue full, or refused at once
            time.sleep(0.02)  # (a tighter loop would mostly measure this process's GIL)
        ended.append(out.status)
        kernel.sock_release(server)
        client.close()


def _good_pair(kernel: Kernel) -> tuple[float, int, int]:
    client, server = _tcp_pair()
    box: dict[str, int] = {}
    thread = threading.Thread(target=lambda: box.update(
        s=TLSConsumer(kernel, timeout_s=20).server(server).status))
    began = time.monotonic()
    thread.start()
    status = TLSConsumer(kernel, timeout_s=20).client(client, peername="localhost").status
    thread.join(25)
    elapsed = time.monotonic() - began
    kernel.sock_release(client)
    kernel.sock_release(server)
    return elapsed, status, box.get("s", -1)


def test_silent_connections_do_not_starve_good_handshakes(kernel: Kernel, pki: PKI,
                                                          tmp_path: Path) -> None:
    agent = start_agent(kernel, write_config(tmp_path, pki, kernel.endpoint, workers=2),
                        workers=2)
    stop, ended = threading.Event(), []
    # ten attacking hosts (127.1.0.1-10) with ten connections each; the good ones come from
    # 127.0.0.1 (one address over max_inflight_per_peer is the other test's case)
    attackers = [threading.Thread(target=_silent_peer, daemon=True,
                                  args=(kernel, f"127.1.0.{1 + n % 10}", stop, ended))
                 for n in range(SILENT)]
    try:
        for thread in attackers:
            thread.start()
        time.sleep(1.0)  # the attack is in place
        times, statuses = [], []
        until = time.monotonic() + ATTACK_S
        while time.monotonic() < until:
            elapsed, client_status, server_status = _good_pair(kernel)
            times.append(elapsed)
            statuses.append((client_status, server_status))
    finally:
        stop.set()
        for thread in attackers:
            thread.join(30)
        log = agent.log
        agent.stop()
    times.sort()
    p50 = statistics.median(times)
    p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
    silent_ended = sum(1 for s in ended if s == -errno.ETIMEDOUT)
    print(f"slot_attack silent={SILENT} good_pairs={len(times)} good_p50_s={p50:.3f} "
          f"good_p99_s={p99:.3f} silent_ended_etimedout={silent_ended} "
          f"eagain={ended.count(-errno.EAGAIN)}")
    assert all(s == (0, 0) for s in statuses), [s for s in statuses if s != (0, 0)]
    assert p99 < 1.0, times[-5:]
    assert silent_ended >= SILENT  # each silent one was ended by the first-flight deadline
    assert any("first_flight_timeout_ms" in line for line in log)


def test_one_address_over_its_limit_is_refused_and_the_others_are_served(kernel: Kernel,
                                                                        pki: PKI,
                                                                        tmp_path: Path) -> None:
    config = write_config(tmp_path, pki, kernel.endpoint, extra="max_inflight_per_peer=4\n")
    agent = start_agent(kernel, config)
    stop, ended = threading.Event(), []
    attackers = [threading.Thread(target=_silent_peer, daemon=True,
                                  args=(kernel, "127.1.0.1", stop, ended)) for _ in range(10)]
    try:
        for thread in attackers:
            thread.start()
        time.sleep(1.0)
        good = [_good_pair(kernel) for _ in range(20)]
        done = subprocess.run([sys.executable, "-m", "tlshd", "status", "--json", "-c",
                               str(config)], check=True, capture_output=True, text=True,
                              timeout=10)
        limits = json.loads(done.stdout)["limits"]
    finally:
        stop.set()
        for thread in attackers:
            thread.join(30)
        agent.stop()
    busy = ended.count(-errno.EBUSY)
    failed = [g for g in good if g[1:] != (0, 0)]
    print(f"per_peer limit=4 attackers=10 ebusy={busy} good_failed={failed}")
    assert busy >= 6  # ten at once from one address, four may wait
    assert limits.get("per_peer", 0) >= 6  # counted where an operator looks
    assert not failed
