"""Whole-path handshake throughput and latency through kernel-sim, by worker count.

    .venv/bin/python bench/bench_agent.py [--pairs N] [--concurrency C] [--workers 1,2]

Each pair is an NFS-style client consumer and server consumer on loopback; the agent
(a separate process) serves both ends, so a pair is two handshakes. Prints a table, then
``key=value`` lines. Also measures what a fork per request would cost in this agent's
process (the reference agent's model), for docs/architecture.md.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernel_sim.consumer import TLSConsumer
from kernel_sim.demo import start_agent, write_demo_config, write_demo_pki
from kernel_sim.kernel import Kernel


def one_pair(kernel: Kernel) -> float:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    result: dict[str, int] = {}
    thread = threading.Thread(target=lambda: result.update(
        status=TLSConsumer(kernel).server(server).status))
    started = time.perf_counter()
    thread.start()
    status = TLSConsumer(kernel).client(client, peername="localhost").status
    thread.join()
    elapsed = time.perf_counter() - started
    kernel.sock_release(client)
    kernel.sock_release(server)
    if status != 0 or result.get("status") != 0:
        raise RuntimeError(f"handshake failed: client {status}, server {result.get('status')}")
    return elapsed


def run(workers: int, pairs: int, concurrency: int, tmp: Path) -> dict[str, float]:
    endpoint = f"tlshd-bench-{os.getpid()}-{workers}"
    with Kernel(endpoint=endpoint) as kernel:
        ns = kernel.add_netns(None)
        config = write_demo_config(tmp, write_demo_pki(tmp), endpoint, workers=workers)
        agent = start_agent(config)
        try:
            kernel.wait_for(lambda: kernel.listeners(ns) >= workers, 20)
            one_pair(kernel)  # warm-up
            started = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                latencies = sorted(pool.map(lambda _: one_pair(kernel), range(pairs)))
            wall = time.perf_counter() - started
        finally:
            agent.terminate()
            agent.wait(30)
    return {
        "hs_per_s": 2 * pairs / wall,
        "pair_p50_ms": 1000 * statistics.median(latencies),
        "pair_p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }


def fork_cost_ms(samples: int = 200) -> float:
    """fork + child exit + reap in this (OpenSSL-loaded) process, per request."""
    started = time.perf_counter()
    for _ in range(samples):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
    return 1000 * (time.perf_counter() - started) / samples


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--workers", default="1,2")
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (int(w) for w in args.workers.split(",")):
            rows[workers] = run(workers, args.pairs, args.concurrency, Path(tmp))
    fork_ms = fork_cost_ms()
    print(f"{'workers':>8} {'hs/s':>8} {'pair p50 ms':>12} {'pair p99 ms':>12}")
    for workers, row in rows.items():
        print(f"{workers:>8} {row['hs_per_s']:>8.1f} {row['pair_p50_ms']:>12.1f} "
              f"{row['pair_p99_ms']:>12.1f}")
    for workers, row in rows.items():
        for key, value in row.items():
            print(f"workers{workers}_{key}={value:.2f}")
    print(f"fork_per_request_ms={fork_ms:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
