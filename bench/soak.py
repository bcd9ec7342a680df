"""Soak: the agent serving handshakes without pause, its workers' memory and fds sampled.

    .venv/bin/python bench/soak.py [--seconds 1800] [--concurrency 4] [--workers 2]

NFS-style client/server pairs through kernel-sim (bench_agent.one_pair) run back to back on
``--concurrency`` threads for ``--seconds``. Every ``--every`` seconds it samples, over the
agent's worker processes, the summed RSS (VmRSS) and open fds. The first ``--warmup`` share of
the run is left out; over the rest it fits RSS against requests served (least squares) and
prints ``name=value`` lines:

- ``requests``: handshake pairs completed (two handshakes each), ``failures``;
- ``rss_kb_after_warmup``, ``rss_kb_end``, ``rss_growth_kb``;
- ``rss_bytes_per_request``: the slope (a leak shows as a steady positive slope; allocator
  noise as a slope near 0 that changes sign between runs);
- ``fds_idle_before``, ``fds_idle_end`` (idle: before the load, and after it stopped),
  ``fds_leaked``.

A 30-minute run is the hardening issue's soak (scripts/soak runs it); tests/sim/test_soak.py
runs 20 seconds of it in CI.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_agent import one_pair
from kernel_sim.demo import start_agent, write_demo_config, write_demo_pki
from kernel_sim.kernel import Kernel


def worker_pids(supervisor: int) -> list[int]:
    """The supervisor's descendants: workers and, with privilege separation, their
    handshake processes."""
    path = Path(f"/proc/{supervisor}/task/{supervisor}/children")
    out = []
    for pid in (int(p) for p in path.read_text().split()):
        out += [pid, *worker_pids(pid)]
    return out


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def sample(supervisor: int) -> tuple[int, int]:
    """(summed RSS in KiB, summed open fds) of the workers."""
    pids = worker_pids(supervisor)
    return (sum(rss_kb(p) for p in pids), sum(len(os.listdir(f"/proc/{p}/fd")) for p in pids))


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x."""
    n = len(points)
    if n < 2:
        return 0.0
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0


class Load:
    """``concurrency`` threads running pairs until stopped; counts what they did."""

    def __init__(self, kernel: Kernel, concurrency: int) -> None:
        self.kernel, self.done, self.failures = kernel, 0, 0
        self.reasons: Counter[str] = Counter()  # "client S, server S" of the failures
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True)
                         for _ in range(concurrency)]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                one_pair(self.kernel)
                ok = True
            except RuntimeError as exc:
                ok = False
                with self._lock:
                    self.reasons[str(exc).removeprefix("handshake failed: ")] += 1
            with self._lock:
                self.done += ok
                self.failures += not ok

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


def soak(seconds: float, concurrency: int, workers: int, every: float,
         warmup: float, log: str | None = None) -> dict[str, float | str]:
    with tempfile.TemporaryDirectory(prefix="tlshd-soak-") as tmp:
        endpoint = f"tlshd-soak-{os.getpid()}"
        with Kernel(endpoint=endpoint) as kernel:
            ns = kernel.add_netns(None)
            config = write_demo_config(Path(tmp), write_demo_pki(Path(tmp)), endpoint,
                                       workers=workers)
            # its log: a line per handshake, so only where asked (--log)
            quiet = open(log or os.devnull, "w")  # noqa: SIM115
            agent = start_agent(config, stderr=quiet)
            try:
                if not kernel.wait_for(lambda: kernel.listeners(ns) >= workers, 30):
                    raise RuntimeError("the agent did not start")
                for _ in range(20):  # every lazy start-up cost paid before the idle sample
                    one_pair(kernel)
                time.sleep(0.5)
                idle_fds_before = sample(agent.pid)[1]
                load = Load(kernel, concurrency)
                load.start()
                points: list[tuple[int, int, int]] = []  # (requests, rss_kb, fds)
                until = time.monotonic() + seconds
                while time.monotonic() < until:
                    time.sleep(min(every, max(0.0, until - time.monotonic())))
                    rss, fds = sample(agent.pid)
                    points.append((load.done, rss, fds))
                load.stop()
                time.sleep(0.5)  # the last DONEs and closes
                rss, idle_fds_end = sample(agent.pid)
                points.append((load.done, rss, idle_fds_end))
            finally:
                agent.terminate()
                agent.wait(40)
                quiet.close()
    kept = points[int(len(points) * warmup):] or points[-1:]
    first, last = kept[0], kept[-1]
    return {
        "seconds": seconds, "requests": load.done, "failures": load.failures,
        "rss_kb_after_warmup": first[1], "rss_kb_end": last[1],
        "rss_growth_kb": last[1] - first[1],
        "rss_bytes_per_request": round(1024 * slope([(r, kb) for r, kb, _ in kept]), 1),
        "fds_idle_before": idle_fds_before, "fds_idle_end": idle_fds_end,
        "fds_leaked": idle_fds_end - idle_fds_before,
        "failure_kinds": "; ".join(f"{n} x {why}" for why, n in load.reasons.most_common(5))
                         or "none",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1800)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--every", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=0.2)
    parser.add_argument("--log", help="the agent's log (a line per handshake)")
    args = parser.parse_args()
    result = soak(args.seconds, args.concurrency, args.workers, args.every, args.warmup,
                  args.log)
    for name, value in result.items():
        print(f"{name}={value}")
    return 0 if result["failures"] == 0 and result["fds_leaked"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
