"""The supervisor when its workers cannot serve: it keeps answering signals and `tlshd status`,
backs off its restarts, and says why once instead of logging a traceback per restart."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kernel_sim.kernel import Kernel
from tests.pki import PKI
from tests.sim.harness import Agent, write_config

pytestmark = pytest.mark.sim


def _status(config: Path) -> dict:
    done = subprocess.run([sys.executable, "-m", "tlshd", "status", "--json", "-c", str(config)],
                          capture_output=True, text=True, timeout=10, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _notifications(agent: Agent) -> list[bytes]:
    """What the agent sent to its NOTIFY_SOCKET so far."""
    assert agent._notify is not None
    agent._notify.setblocking(False)
    messages = []
    while True:
        try:
            messages.append(agent._notify.recv(4096))
        except BlockingIOError:
            return messages


def test_a_crash_looping_agent_answers_backs_off_and_stops_at_once(kernel: Kernel, pki: PKI,
                                                                   tmp_path: Path):
    """Without CAP_NET_ADMIN every ACCEPT is EPERM (kernel-sim checks it as Linux does), so
    each worker dies at its first ACCEPT."""
    config = write_config(tmp_path, pki, kernel.endpoint, workers=2)
    agent = Agent(config, wrap=("setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin"))
    try:
        time.sleep(4.0)
        assert agent.proc.poll() is None, "\n".join(agent.log)
        doc = _status(config)
        problem, restarts = doc["worker_problem"], doc["worker_restarts"]
        # 2 workers, delays 0.5, 1, 2 s each: about 6 restarts in 4 s (it was 16, every 0.5 s)
        assert "EPERM" in problem and "CAP_NET_ADMIN" in problem, problem
        assert 2 <= restarts <= 8, restarts
        text = subprocess.run([sys.executable, "-m", "tlshd", "status", "-c", str(config)],
                              capture_output=True, text=True, timeout=10, check=False).stdout
        assert "WORKERS CANNOT SERVE" in text and "CAP_NET_ADMIN" in text, text
        assert any(b"STATUS=workers cannot serve" in m and b"CAP_NET_ADMIN" in m
                   for m in _notifications(agent)), "no sd_notify STATUS= with the cause"
        began = time.monotonic()
        agent.proc.send_signal(signal.SIGTERM)
        code = agent.proc.wait(timeout=10)
        stop_s = time.monotonic() - began
    finally:
        agent.stop()
    log = agent.log
    print(f"crash_loop_restarts_4s={restarts} stop_s={stop_s:.3f} log_lines={len(log)}")
    assert code == 0 and stop_s < 1.0
    assert not [line for line in log if "Traceback" in line]
    said = [line for line in log if "worker cannot serve" in line or "died (" in line]
    assert 1 <= len(said) <= 3, said  # the cause once (by a worker and by the supervisor)
