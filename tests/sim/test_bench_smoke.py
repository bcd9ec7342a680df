"""The benchmark must keep running: a short smoke, no timing assertion."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.sim
BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_agent.py"


def test_bench_agent_smoke_prints_its_figures():
    done = subprocess.run([sys.executable, str(BENCH), "--pairs", "4", "--concurrency", "2",
                           "--workers", "1"], capture_output=True, text=True, timeout=180,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    assert float(figures["workers1_hs_per_s"]) > 0
    assert float(figures["fork_per_request_ms"]) > 0
