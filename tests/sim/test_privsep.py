"""Privilege separation in the running agent ([agent] privsep, tlshd/agent/privsep.py).

The agent runs as root with every capability here, as under the tests' harness: each worker
must still run its handshakes in a child with CapEff 0, NoNewPrivs 1 and Seccomp 2, as
``worker_user``, while the worker (the monitor) keeps its privileges; handshakes of every
kind keep working through the monitor; and a handshake process that dies leaves no request
without a DONE."""

from __future__ import annotations

import errno
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from kernel_sim.consumer import HandshakeOutcome, TLSConsumer
from kernel_sim.kernel import Kernel
from tests.pki import PKI
from tests.sim.harness import Agent, pair, start_agent, unique_endpoint, write_config
from tlshd.agent import sandbox

pytestmark = [pytest.mark.sim,
              pytest.mark.skipif(os.geteuid() != 0, reason="separation needs root")]
CAP_NET_ADMIN = 1 << 12


def _started(kernel: Kernel, tmp_path: Path, pki: PKI, extra: str = "") -> Agent:
    agent = start_agent(kernel, write_config(tmp_path, pki, kernel.endpoint, workers=2,
                                             require_client_cert=True, extra=extra), workers=2)
    assert pair(kernel) == (0, 0), "\n".join(agent.log)
    return agent


def _caps(pid: int) -> int:
    return int(sandbox.status_fields(pid)["CapEff"], 16)


def test_handshakes_run_confined_and_the_monitors_keep_the_privileges(pki: PKI,
                                                                      tmp_path: Path) -> None:
    with Kernel(endpoint=unique_endpoint()) as kernel:
        kernel.add_netns(None)
        agent = _started(kernel, tmp_path, pki)
        try:
            confined = agent.handshake_pids()
            monitors = [p for p in agent.worker_pids() if p not in confined]
            assert len(confined) == len(monitors) == 2
            nobody = sandbox.resolve_user("nobody")
            for pid in confined:
                fields = sandbox.status_fields(pid)
                print(pid, {k: fields[k] for k in ("Uid", "CapEff", "NoNewPrivs", "Seccomp")})
                assert fields["CapEff"] == "0000000000000000"
                assert fields["NoNewPrivs"] == "1" and fields["Seccomp"] == "2"
                assert fields["Uid"].split()[0] == str(nobody.uid)
            for pid in monitors:
                assert _caps(pid) & CAP_NET_ADMIN and sandbox.status_fields(pid)["Uid"][0] == "0"
            for _ in range(4):  # both roles, mutual x509, through both workers
                assert pair(kernel) == (0, 0)
        finally:
            agent.stop()


def test_a_handshake_process_killed_mid_request_leaves_a_done_eio_and_is_replaced(
        pki: PKI, tmp_path: Path) -> None:
    with Kernel(endpoint=unique_endpoint()) as kernel:
        kernel.add_netns(None)
        agent = start_agent(kernel, write_config(  # only the kill can end it early
            tmp_path, pki, kernel.endpoint, workers=1, timeout_ms=30_000,
            extra="first_flight_timeout_ms=30000\n"))
        try:
            with socket.create_server(("127.0.0.1", 0)) as listener:
                silent = socket.create_connection(listener.getsockname())
                server, _ = listener.accept()
            box: dict[str, HandshakeOutcome] = {}
            thread = threading.Thread(target=lambda: box.update(
                o=TLSConsumer(kernel, timeout_s=30).server(server)))
            thread.start()
            assert kernel.wait_for(lambda: kernel.events("cmd_accept"), 10)
            time.sleep(0.2)  # the handshake process holds it, waiting for a ClientHello
            (victim,) = agent.handshake_pids()
            (monitor,) = [p for p in agent.worker_pids() if p != victim]
            killed = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            thread.join(10)
            waited = time.monotonic() - killed
            print(f"DONE {box['o'].status} {waited * 1000:.0f} ms after the kill")
            assert box["o"].status == -errno.EIO and waited < 5.0, "\n".join(agent.log)
            silent.close()
            kernel.sock_release(server)
            # the monitor exits with its handshake process; a new worker joins the group
            with socket.socket() as probe:
                ns = kernel.netns_of(probe)
            assert kernel.wait_for(lambda: monitor not in agent.worker_pids()
                                   and kernel.listeners(ns) >= 1, 10), "\n".join(agent.log)
            assert pair(kernel) == (0, 0), "\n".join(agent.log)
        finally:
            agent.stop()


def test_privsep_false_runs_the_handshakes_in_the_worker(pki: PKI, tmp_path: Path) -> None:
    with Kernel(endpoint=unique_endpoint()) as kernel:
        kernel.add_netns(None)
        agent = _started(kernel, tmp_path, pki, extra="privsep=false\n")
        try:
            workers = agent.worker_pids()
            assert len(workers) == 2 and agent.handshake_pids() == workers
            assert all(_caps(pid) & CAP_NET_ADMIN for pid in workers)
        finally:
            agent.stop()


def test_an_unknown_worker_user_is_reported_not_crash_looped(pki: PKI, tmp_path: Path) -> None:
    with Kernel(endpoint=unique_endpoint()) as kernel:
        kernel.add_netns(None)
        agent = Agent(write_config(tmp_path, pki, kernel.endpoint,
                                   extra="worker_user=tlshd-no-such-user\n"), None)
        try:
            assert kernel.wait_for(lambda: any("no user 'tlshd-no-such-user'" in line
                                               for line in agent.log), 15), agent.log
            assert agent.proc.poll() is None  # the supervisor lives on and says why
            assert not [line for line in agent.log if "Traceback" in line]
        finally:
            agent.stop()


def test_sslkeylogfile_is_still_written_by_a_confined_handshake_process(
        pki: PKI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file is opened before the handshake process gives up root (a debugging aid the
    agent warns about; its directory here is root's alone)."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    keylog = private / "keys.log"
    monkeypatch.setenv("SSLKEYLOGFILE", str(keylog))
    with Kernel(endpoint=unique_endpoint()) as kernel:
        kernel.add_netns(None)
        agent = _started(kernel, tmp_path, pki)
        try:
            lines = keylog.read_text().splitlines()
            assert any(line.startswith("CLIENT_HANDSHAKE_TRAFFIC_SECRET ") for line in lines)
            assert keylog.stat().st_uid == 0 and keylog.stat().st_mode & 0o777 == 0o600
        finally:
            agent.stop()
