"""The benchmark must keep running: a short smoke, no timing assertion."""

import math
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


def test_bench_prints_every_issue_16_figure():
    bench = BENCH.parent / "bench.py"
    done = subprocess.run([sys.executable, str(bench), "--seconds", "0.5", "--pairs", "3",
                           "--concurrency", "2", "--workers", "1"], capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = {k: float(v) for k, v in (line.split("=", 1) for line in done.stdout.splitlines()
                                        if "=" in line)}
    for key in ("cpu_ratio_x509", "cpu_ratio_psk", "agent_cpu_ms_x509", "agent_cpu_ms_psk",
                "ceiling_cpu_ms_x509", "ceiling_cpu_ms_psk", "harness_cpu_ms_x509",
                "harness_share_psk", "overhead_cpu_p50_ms", "overhead_cpu_p99_ms",
                "psk_overhead_cpu_p99_ms", "request_cpu_p99_ms", "accept_to_done_p99_ms",
                "idle_rss_mb", "idle_pss_mb", "idle_uss_mb", "idle_pss_mb_supervisor",
                "inflight_kb", "rate_ratio_x509", "rate_ratio_psk"):
        assert figures[key] > 0, key
    assert figures["fds_leaked"] == 0
    # the per-request CPU covers the whole request: more than the OpenSSL part alone
    assert figures["request_cpu_p50_ms"] > figures["overhead_cpu_p50_ms"]


@pytest.mark.netns
def test_burst_smoke_completes_a_small_storm_through_the_pending_cap():
    """3 namespaces, 300 requests, 60 pairs (120 requests) in flight per namespace against a
    pending cap of 50: EAGAIN retries happen and every request still completes."""
    burst = BENCH.parent / "burst.py"
    done = subprocess.run([sys.executable, str(burst), "--namespaces", "3", "--requests", "300",
                           "--concurrency", "60"], capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    figures = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    assert int(figures["burst_requests"]) == 300
    assert int(figures["burst_completed"]) == 300
    assert int(figures["burst_failures"]) == 0
    assert int(figures["burst_agents_exit_nonzero"]) == 0
    for key in ("burst_eagain_retries", "burst_slowest_wait_s", "burst_p99_wait_s",
                "burst_seconds", "burst_hs_per_s", "burst_pending_cap"):
        assert key in figures, key


def test_privsep_cost_smoke_prints_both_modes():
    bench = BENCH.parent / "privsep_cost.py"
    done = subprocess.run([sys.executable, str(bench), "--rounds", "1", "--pairs", "3",
                           "--concurrency", "2"], capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    for key in ("hs_per_s_on", "hs_per_s_off", "rate_ratio", "psk_rate_ratio"):
        assert float(figures[key]) > 0, key
    for key in ("cpu_ms_on", "cpu_ms_off", "psk_cpu_ms_on", "psk_cpu_ms_off"):
        assert float(figures[key]) >= 0, key
    # 3 pairs can read 0 clock ticks of CPU in one mode: the ratio is then NaN, never a crash
    for key in ("cpu_ratio", "psk_cpu_ratio"):
        value = float(figures[key])
        assert value > 0 or math.isnan(value), key


def test_ratio_is_nan_where_the_denominator_measured_nothing():
    from bench.bench import ratio
    assert ratio(3.0, 2.0) == 1.5
    assert math.isnan(ratio(1.0, 0.0))
