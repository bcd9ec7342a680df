"""bench/real_kernel.py must keep running: one cycle per agent, no timing assertion.

Marker ``qemu`` (two boots, about 3-4 minutes): run by scripts/test with the real-kernel tier.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.qemu
BENCH = Path(__file__).resolve().parents[2] / "bench" / "real_kernel.py"


def test_real_kernel_bench_compares_both_agents(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the QEMU tier needs root")
    done = subprocess.run([sys.executable, str(BENCH), "--cycles", "1", "--out", str(tmp_path)],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=3600, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    figures = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    for agent in ("tlshd", "reference"):
        assert int(figures[f"{agent}_psk_handshakes"]) == 6  # one connect: 3 queues, 2 sides
        assert int(figures[f"{agent}_x509_handshakes"]) == 2  # one mount: client and server
        assert float(figures[f"{agent}_psk_accept_to_done_ms"]) > 0
    assert float(figures["accept_to_done_ratio_psk"]) > 0
    assert float(figures["accept_to_done_ratio_x509"]) > 0
