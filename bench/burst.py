"""A reconnect storm: 10,000 handshake requests across 16 network namespaces at once.

    .venv/bin/python bench/burst.py [--namespaces 16] [--requests 10000] [--concurrency 100]
                                    [--workers 1]

Every namespace gets its own agent (``ip netns exec NS python -m tlshd``, as the per-namespace
systemd unit runs it) on one kernel-sim. The requests come in client/server pairs over loopback
TCP inside each namespace (a pair is two requests, like an NVMe queue or an NFS connection),
both sides served by that namespace's agent, x509, through kernel-sim's consumers:

* the kernel's pending cap is in force (``hn_pending_max``: 3..50 from RAM, 50 here): a submit
  over it fails with EAGAIN, and the consumer tries again after a back-off (0.1 s doubling to
  3 s, with jitter), as the NFS client's transport reconnect and the NVMe host's reconnect do;
* consumer timeouts are the kernel's: 10 s for a client request (``XS_TLS_HANDSHAKE_TO``, the
  NVMe host's 10 s), 20 s for a server request (``SVC_HANDSHAKE_TO``), then cancel;
* ``--concurrency`` pairs per namespace are in flight from the start (100 pairs: 200 requests
  against a cap of 50), until every namespace's share is done.

A failure is any request that does not end with status 0 (a timeout, a DONE with an error, a
submit error other than EAGAIN). Prints a table, then ``key=value`` lines: ``burst_requests``,
``burst_completed``, ``burst_failures``, ``burst_eagain_retries``, ``burst_slowest_wait_s``
(first submit attempt to DONE, the slowest request), ``burst_p99_wait_s``, ``burst_seconds``,
``burst_hs_per_s``.
"""

from __future__ import annotations

import argparse
import errno
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernel_sim.consumer import HandshakeOutcome, TLSConsumer
from kernel_sim.kernel import Kernel
from kernel_sim.netns import run_in_netns, socket_in_netns
from tests.pki import write_pki
from tests.sim.harness import Agent, start_agent, write_config

CLIENT_TIMEOUT_S, SERVER_TIMEOUT_S = 10.0, 20.0
BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.1, 3.0


@dataclass
class Outcome:
    status: int
    wait_s: float  # first submit attempt to the consumer's done (or its timeout)
    retries: int


def with_retries(submit: Callable[[], HandshakeOutcome]) -> Outcome:
    """Submit; on EAGAIN (the pending cap) back off and submit again."""
    start, retries, backoff = time.monotonic(), 0, BACKOFF_FIRST_S
    while True:
        out = submit()
        if out.status != -errno.EAGAIN:
            return Outcome(out.status, time.monotonic() - start, retries)
        retries += 1
        time.sleep(backoff * random.uniform(0.5, 1.5))
        backoff = min(backoff * 2, BACKOFF_MAX_S)


class Namespace:
    def __init__(self, kernel: Kernel, name: str) -> None:
        self.kernel, self.name = kernel, name
        self.listener = run_in_netns(name, lambda: socket.create_server(("127.0.0.1", 0),
                                                                           backlog=1024))
        self._accept_lock = threading.Lock()

    def pair(self) -> tuple[socket.socket, socket.socket]:
        with self._accept_lock:
            client = socket_in_netns(self.name)
            client.connect(self.listener.getsockname())
            server, _ = self.listener.accept()
        return client, server

    def one_pair(self, results: list[Outcome]) -> None:
        client, server = self.pair()
        box: dict[str, Outcome] = {}

        def server_side() -> None:
            consumer = TLSConsumer(self.kernel, timeout_s=SERVER_TIMEOUT_S)
            box["server"] = with_retries(lambda: consumer.server(server))

        thread = threading.Thread(target=server_side)
        thread.start()
        consumer = TLSConsumer(self.kernel, timeout_s=CLIENT_TIMEOUT_S)
        results.append(with_retries(lambda: consumer.client(client, peername="localhost")))
        thread.join(SERVER_TIMEOUT_S * 3)
        results.append(box.get("server", Outcome(-errno.ETIMEDOUT, SERVER_TIMEOUT_S * 3, 0)))
        self.kernel.sock_release(client)
        self.kernel.sock_release(server)

    def run(self, pairs: int, concurrency: int, results: list[Outcome]) -> None:
        """``pairs`` pairs, ``concurrency`` at a time."""
        left = iter(range(pairs))
        lock = threading.Lock()

        def loop() -> None:
            while True:
                with lock:
                    if next(left, None) is None:
                        return
                self.one_pair(results)

        threads = [threading.Thread(target=loop) for _ in range(min(concurrency, pairs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--namespaces", type=int, default=16)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=100, help="pairs per namespace")
    parser.add_argument("--workers", type=int, default=1, help="worker processes per agent")
    args = parser.parse_args()
    threading.stack_size(512 * 1024)
    names = [f"tlshd-burst-{uuid.uuid4().hex[:6]}-{i}" for i in range(args.namespaces)]
    tmp = Path(tempfile.mkdtemp(prefix="tlshd-burst-"))
    pki = write_pki(tmp / "pki")
    agents: list[Agent] = []
    pairs_per_ns = args.requests // 2 // args.namespaces
    try:
        for name in names:
            subprocess.run(["ip", "netns", "add", name], check=True)
            subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        with Kernel(endpoint=f"tlshd-burst-{uuid.uuid4().hex[:8]}") as kernel:
            spaces = []
            for name in names:
                ns = kernel.add_netns(name)
                config = write_config(tmp, pki, kernel.endpoint, workers=args.workers,
                                      timeout_ms=int(SERVER_TIMEOUT_S * 1000))
                agents.append(start_agent(kernel, config, netns=name, workers=args.workers))
                spaces.append(Namespace(kernel, name))
            cap = ns.hn.pending_max
            results: list[Outcome] = []
            start = time.monotonic()
            threads = [threading.Thread(target=space.run,
                                        args=(pairs_per_ns, args.concurrency, results))
                       for space in spaces]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            seconds = time.monotonic() - start
            for space in spaces:
                space.listener.close()
            submits = len(kernel.events("submit")) + len(kernel.events("submit_err"))
    finally:
        stops = [agent.stop() for agent in agents]
        for name in names:
            subprocess.run(["ip", "netns", "del", name], check=False)
    completed = [r for r in results if r.status == 0]
    failures = [r for r in results if r.status != 0]
    waits = [r.wait_s for r in results]
    figures = {
        "burst_namespaces": args.namespaces,
        "burst_pending_cap": cap,
        "burst_requests": len(results),
        "burst_completed": len(completed),
        "burst_failures": len(failures),
        "burst_eagain_retries": sum(r.retries for r in results),
        "burst_submits": submits,
        "burst_slowest_wait_s": max(waits),
        "burst_p99_wait_s": percentile(waits, 0.99),
        "burst_p50_wait_s": percentile(waits, 0.50),
        "burst_seconds": seconds,
        "burst_hs_per_s": len(completed) / seconds,
        "burst_agents_exit_nonzero": sum(1 for rc in stops if rc != 0),
    }
    statuses: dict[int, int] = {}
    for r in failures:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    print(f"{args.requests} requests ({pairs_per_ns} client/server pairs per namespace) across "
          f"{args.namespaces} namespaces, one agent each ({args.workers} worker(s)), pending cap "
          f"{cap}, {args.concurrency} pairs in flight per namespace")
    print(f"completed {len(completed)}, failed {len(failures)} {statuses or ''}, "
          f"EAGAIN retries {figures['burst_eagain_retries']}, in {seconds:.1f} s")
    print(f"wait (first submit to done): p50 {figures['burst_p50_wait_s']:.2f} s, "
          f"p99 {figures['burst_p99_wait_s']:.2f} s, slowest {figures['burst_slowest_wait_s']:.2f} s")
    for key, value in figures.items():
        print(f"{key}={value:.3f}" if isinstance(value, float) else f"{key}={value}")
    return 0 if not failures else 1


if __name__ == "__main__":
    raise SystemExit(main())
