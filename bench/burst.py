"""A reconnect storm: 10,000 handshake requests across 16 network namespaces at once.

    .venv/bin/python bench/burst.py [--namespaces 16] [--requests 10000] [--concurrency 200]
                                    [--workers 1]

Every namespace gets its own agent (``ip netns exec NS python -m tlshd``, as the per-namespace
systemd unit runs it) on one kernel-sim. Each request is a loopback TCP connection inside its
namespace whose one end goes to the agent through kernel-sim's consumer API (half of them client
requests, half server requests, x509) and whose other end goes to an independent TLS peer
(bench/tls_peer.py, pyOpenSSL in its own process): a request's peer never waits in the kernel's
queue itself, as with a remote NFS server or NVMe target.

* the kernel's pending cap is in force (``hn_pending_max``: 3..50 from RAM, 50 here): a submit
  over it fails with EAGAIN, and the consumer tries again after a back-off (0.1 s doubling to
  3 s, with jitter), as the NFS client's transport reconnect and the NVMe host's reconnect do;
* consumer timeouts are the kernel's: 10 s for a client request (``XS_TLS_HANDSHAKE_TO``, the
  NVMe host's 10 s), 20 s for a server request (``SVC_HANDSHAKE_TO``), then cancel;
* ``--concurrency`` requests per namespace are in flight from the start (200: four times the
  cap), until every namespace's share is done.

A failure is any request that does not end with status 0 (a timeout, a DONE with an error, a
submit error other than EAGAIN). Prints a table, then ``key=value`` lines: ``burst_requests``,
``burst_completed``, ``burst_failures``, ``burst_eagain_retries``, ``burst_slowest_wait_s``
(first submit attempt to DONE, back-offs included, the slowest request), ``burst_p99_wait_s``,
``burst_submit_to_done_max_s`` (the longest a request's consumer timer ran: successful submit to
DONE, from kernel-sim's trace), ``burst_seconds``, ``burst_hs_per_s``.
"""

from __future__ import annotations

import argparse
import array
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
from tests.kernel.evidence import from_sim, summarize
from tests.pki import PKI, write_pki
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


class PeerProcess:
    """bench/tls_peer.py, fed connected sockets over a SEQPACKET socket with SCM_RIGHTS."""

    def __init__(self, pki: PKI) -> None:
        self.control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("tls_peer.py")), str(theirs.fileno()),
             str(pki.ca), str(pki.server.cert), str(pki.server.key)],
            pass_fds=(theirs.fileno(),))
        theirs.close()
        self._lock = threading.Lock()

    def hand_over(self, role: bytes, sock: socket.socket) -> None:
        with self._lock:
            self.control.sendmsg([role], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                           array.array("i", [sock.fileno()]))])
        sock.close()

    def close(self) -> None:
        self.control.close()
        self.proc.wait(120)


class Namespace:
    def __init__(self, kernel: Kernel, name: str, peer: PeerProcess) -> None:
        self.kernel, self.name, self.peer = kernel, name, peer
        self.listener = run_in_netns(name, lambda: socket.create_server(("127.0.0.1", 0),
                                                                           backlog=4096))
        self._accept_lock = threading.Lock()

    def pair(self) -> tuple[socket.socket, socket.socket]:
        with self._accept_lock:
            client = socket_in_netns(self.name)
            client.connect(self.listener.getsockname())
            server, _ = self.listener.accept()
        return client, server

    def one_request(self, index: int, results: list[Outcome]) -> None:
        """Even: a client request (the peer serves); odd: a server request."""
        client, server = self.pair()
        consumer = TLSConsumer(self.kernel, timeout_s=CLIENT_TIMEOUT_S)
        if index % 2 == 0:
            self.peer.hand_over(b"s", server)
            mine = client
            results.append(with_retries(lambda: consumer.client(mine, peername="localhost")))
        else:
            self.peer.hand_over(b"c", client)
            mine = server
            consumer.timeout_s = SERVER_TIMEOUT_S
            results.append(with_retries(lambda: consumer.server(mine)))
        self.kernel.sock_release(mine)

    def run(self, requests: int, concurrency: int, results: list[Outcome]) -> None:
        """``requests`` requests, ``concurrency`` at a time."""
        left = iter(range(requests))
        lock = threading.Lock()

        def loop() -> None:
            while True:
                with lock:
                    index = next(left, None)
                if index is None:
                    return
                try:
                    self.one_request(index, results)
                except OSError as exc:  # the harness itself failed: count it, say why
                    print(f"burst: request {index} in {self.name}: {exc!r}", file=sys.stderr)
                    results.append(Outcome(-(exc.errno or errno.EIO), 0.0, 0))

        threads = [threading.Thread(target=loop) for _ in range(min(concurrency, requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def kernel_times(kernel: Kernel) -> dict[str, float]:
    """From kernel-sim's trace: the longest a request waited in the queue (submit to ACCEPT)
    and the longest the agent held one (ACCEPT to DONE). The consumer's timer runs from the
    successful submit: their sum must stay under 10 s (20 s for a server request)."""
    timings = summarize(from_sim(kernel.trace), {}, {}).timings
    return {
        "burst_queue_wait_max_s": max((t.submit_to_accept_ms for t in timings), default=0) / 1000,
        "burst_agent_hold_max_s": max((t.accept_to_done_ms for t in timings), default=0) / 1000,
        "burst_submit_to_done_max_s": max(
            (t.submit_to_accept_ms + t.accept_to_done_ms for t in timings), default=0) / 1000,
    }


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def report(args: argparse.Namespace, figures: dict[str, float], failures: list[Outcome]) -> None:
    statuses: dict[int, int] = {}
    for r in failures:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    print(f"{args.requests} requests (half client, half server) across {args.namespaces} "
          f"namespaces, one agent each ({args.workers} worker(s)), pending cap "
          f"{figures['burst_pending_cap']}, {args.concurrency} requests in flight per namespace")
    print(f"completed {figures['burst_completed']}, failed {len(failures)} {statuses or ''}, "
          f"EAGAIN retries {figures['burst_eagain_retries']}, in {figures['burst_seconds']:.1f} s")
    print(f"wait (first submit to done): p50 {figures['burst_p50_wait_s']:.2f} s, "
          f"p99 {figures['burst_p99_wait_s']:.2f} s, "
          f"slowest {figures['burst_slowest_wait_s']:.2f} s")
    print(f"in the kernel (submitted to DONE, the consumer's timer): slowest "
          f"{figures['burst_submit_to_done_max_s']:.2f} s (queue "
          f"{figures['burst_queue_wait_max_s']:.2f} s, agent "
          f"{figures['burst_agent_hold_max_s']:.2f} s); worker deaths "
          f"{figures['burst_worker_deaths']}")
    for key, value in figures.items():
        print(f"{key}={value:.3f}" if isinstance(value, float) else f"{key}={value}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--namespaces", type=int, default=16)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=200,
                        help="requests in flight per namespace")
    parser.add_argument("--workers", type=int, default=1, help="worker processes per agent")
    args = parser.parse_args()
    threading.stack_size(512 * 1024)
    names = [f"tlshd-burst-{uuid.uuid4().hex[:6]}-{i}" for i in range(args.namespaces)]
    tmp = Path(tempfile.mkdtemp(prefix="tlshd-burst-"))
    pki = write_pki(tmp / "pki")
    agents: list[Agent] = []
    stops: list[int] = []
    share = [args.requests // args.namespaces + (1 if i < args.requests % args.namespaces else 0)
             for i in range(args.namespaces)]
    peer = PeerProcess(pki)
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
                spaces.append(Namespace(kernel, name, peer))
            cap = ns.hn.pending_max
            results: list[Outcome] = []
            start = time.monotonic()
            threads = [threading.Thread(target=space.run,
                                        args=(count, args.concurrency, results))
                       for space, count in zip(spaces, share, strict=True)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            seconds = time.monotonic() - start
            for space in spaces:
                space.listener.close()
            submits = len(kernel.events("submit")) + len(kernel.events("submit_err"))
            in_kernel = kernel_times(kernel)
            stops = [agent.stop() for agent in agents]  # while their kernel still runs
    finally:
        if not stops:  # an error above: stop them anyway
            stops = [agent.stop() for agent in agents]
        peer.close()
        failed_lines = [line for agent in agents for line in agent.log if " status=0 " not in line
                        and "handshake" in line]
        # the supervisor restarts a dead worker and still exits 0: its log is the evidence
        worker_deaths = sum("died" in line for agent in agents for line in agent.log)
        for line in failed_lines[:5]:
            print(f"burst: agent: {line}", file=sys.stderr)
        for name in names:
            subprocess.run(["ip", "netns", "del", name], check=False)
    completed = [r for r in results if r.status == 0]
    failures = [r for r in results if r.status != 0]
    waits = [r.wait_s for r in results]
    figures: dict[str, float] = {
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
        "burst_worker_deaths": worker_deaths,
        **in_kernel,
    }
    report(args, figures, failures)
    return 0 if not failures and not worker_deaths else 1


if __name__ == "__main__":
    raise SystemExit(main())
