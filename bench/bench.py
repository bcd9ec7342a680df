"""The agent against the OpenSSL ceiling, measured in one run on this machine.

    .venv/bin/python bench/bench.py [--seconds S] [--pairs N] [--concurrency C] [--workers W]

Prints a table, then ``key=value`` figures (issue 7):

* ``ceiling_hs_per_s``: the same TLS 1.3 handshakes (same certificate, key, group, cipher;
  ``W`` processes) done by pyOpenSSL in memory, no agent, no kernel: the practical limit.
* ``agent_x509_hs_per_s`` / ``agent_psk_hs_per_s``: through the whole path (kernel-sim
  consumer -> READY -> ACCEPT -> handshake against the agent's other end -> key
  installation -> DONE). kernel-sim and its consumers run in this process, on the same cores:
  what they cost is charged to the agent here.
* ``ratio_x509_to_ceiling``, ``ratio_psk_to_ceiling``.
* ``overhead_p50_ms``/``overhead_p99_ms``: per request, the worker's busy time on it minus the
  time inside OpenSSL (the agent's ``busy=`` and ``tls=`` figures): the agent's own work.
  ``wall_minus_tls_*``: ACCEPT-to-DONE wall time minus OpenSSL time (waiting included);
  ``ready_to_accept_p50_ms``/``_p99_ms``: submit to ACCEPT, from kernel-sim's trace.
* ``agent_cpu_ms_per_hs`` (the agent's processes' CPU per x509 handshake) against
  ``ceiling_cpu_ms_per_hs``: ``cpu_efficiency_vs_ceiling`` is the share of the agent's CPU
  that is the TLS work itself, independent of kernel-sim's own cost.
* ``idle_rss_mb`` (supervisor + workers, RSS summed: shared pages counted in each process),
  ``idle_pss_mb`` (the same processes' PSS: shared pages counted once), ``idle_rss_per_process_mb``,
  ``rss_per_inflight_kb`` (100 stalled handshakes),
  ``fds_leaked`` (workers' fds before and after everything).
"""

from __future__ import annotations

import argparse
import errno
import multiprocessing
import os
import re
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import contextlib

from OpenSSL import SSL

from bench.bench_agent import one_pair
from kernel_sim.consumer import TLSConsumer
from kernel_sim.demo import write_demo_config, write_demo_pki
from kernel_sim.kernel import Kernel
from kernel_sim.nvme import NVMeHost, NVMeKeyring, NVMeTarget, psk_identity
from tlshd.config import parse_config
from tlshd.credentials.contexts import Contexts
from tlshd.netlink.messages import AcceptReply, Header
from tlshd.netlink.spec import AuthMode, MsgType

STALLED = 100


# --- the ceiling -------------------------------------------------------------------------


def _reply(message_type: MsgType) -> AcceptReply:
    return AcceptReply(Header(0, 0, 1, 0), 0, message_type, AuthMode.X509, "localhost", None,
                       None, (), None, ())


def _ceiling_worker(config_text: str, seconds: float, out: multiprocessing.Queue) -> None:
    """Client/server pairs over memory BIOs with the agent's own contexts, for ``seconds``."""
    contexts = Contexts.from_config(parse_config(config_text))
    client_ctx = contexts(_reply(MsgType.CLIENTHELLO))
    server_ctx = contexts(_reply(MsgType.SERVERHELLO))
    done, deadline = 0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        _memory_pair(client_ctx, server_ctx)
        done += 2
    out.put(done / seconds)


def _memory_pair(client_ctx: SSL.Context, server_ctx: SSL.Context) -> None:
    client, server = SSL.Connection(client_ctx), SSL.Connection(server_ctx)
    client.set_connect_state()
    server.set_accept_state()
    finished = [False, False]
    while not all(finished):
        for i, (a, b) in enumerate(((client, server), (server, client))):
            if not finished[i]:
                try:
                    a.do_handshake()
                    finished[i] = True
                except SSL.WantReadError:
                    pass
            with contextlib.suppress(SSL.WantReadError):
                b.bio_write(a.bio_read(65536))


def ceiling(config_text: str, processes: int, seconds: float) -> float:
    queue: multiprocessing.Queue = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=_ceiling_worker, args=(config_text, seconds, queue))
             for _ in range(processes)]
    for proc in procs:
        proc.start()
    rates = [queue.get(timeout=seconds + 60) for _ in procs]
    for proc in procs:
        proc.join()
    return sum(rates)


# --- the agent ------------------------------------------------------------------------------


def _proc_kb(pids: list[int], file: str, field: str) -> int:
    """The sum over ``pids`` of a ``<field>: <n> kB`` line of /proc/<pid>/<file>."""
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
            if line.startswith(field + ":"):
                total += int(line.split()[1])
    return total


def rss_kb(pids: list[int]) -> int:
    return _proc_kb(pids, "status", "VmRSS")


def pss_kb(pids: list[int]) -> int:
    """Proportional set size: shared pages (the fork-shared Python and OpenSSL code and data)
    split between the processes that map them, so the sum is what the agent costs the machine."""
    return _proc_kb(pids, "smaps_rollup", "Pss")


def children(pid: int) -> list[int]:
    """Every descendant: the workers (monitors, with privilege separation) and their
    handshake processes."""
    out = []
    for child in (int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()):
        out += [child, *children(child)]
    return out


def cpu_s(pids: list[int]) -> float:
    """utime + stime of these processes (clock ticks from /proc/PID/stat)."""
    ticks = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def fd_count(pids: list[int]) -> int:
    return sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in pids)


def psk_pair(kernel: Kernel, ring: NVMeKeyring) -> float:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    target = NVMeTarget(kernel, keyring=ring.serial)
    box: dict[str, int] = {}
    started = time.perf_counter()
    thread = threading.Thread(target=lambda: box.update(s=target.handshake(server).status))
    thread.start()
    host = NVMeHost(kernel, hostnqn="bench-host", subnqn="bench-subsys", keyring=ring.serial)
    status = host.connect(client).status
    thread.join()
    elapsed = time.perf_counter() - started
    kernel.sock_release(client)
    kernel.sock_release(server)
    if status or box.get("s"):
        raise RuntimeError(f"PSK handshake failed: {status}, {box.get('s')}")
    return elapsed


def rate(fn, pairs: int, concurrency: int) -> float:
    fn()  # warm-up
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda _: fn(), range(pairs)))
    return 2 * pairs / (time.perf_counter() - started)


def _submit_until_queued(consumer: TLSConsumer, sock: socket.socket) -> None:
    """A client request; over the kernel's pending cap (EAGAIN) it is submitted again."""
    while consumer.client(sock, peername="localhost").status == -errno.EAGAIN:
        time.sleep(0.05)


def stalled_rss(kernel: Kernel, agent_pids: list[int]) -> float:
    """RSS growth per in-flight handshake: clients whose servers never answer."""
    before = rss_kb(agent_pids)
    accepted_before = len(kernel.events("cmd_accept"))
    listener = socket.create_server(("127.0.0.1", 0), backlog=STALLED + 8)
    socks, peers, threads = [], [], []
    for _ in range(STALLED):
        sock = socket.create_connection(listener.getsockname())
        peers.append(listener.accept()[0])
        socks.append(sock)
        consumer = TLSConsumer(kernel, timeout_ms=30_000, timeout_s=60)
        threads.append(threading.Thread(target=_submit_until_queued, args=(consumer, sock),
                                        daemon=True))
    for thread in threads:
        thread.start()
    if not kernel.wait_for(
            lambda: len(kernel.events("cmd_accept")) - accepted_before >= STALLED, 30):
        raise RuntimeError(f"fewer than {STALLED} stalled handshakes were ever in flight")
    time.sleep(0.5)
    grown = (rss_kb(agent_pids) - before) / STALLED
    for sock in (*socks, *peers, listener):  # the agent sees the peers go and ends them
        sock.close()
    return grown


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else 0.0


def agent_figures(args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    endpoint = f"tlshd-bench-{os.getpid()}"
    from kernel_sim.demo import start_agent

    pki = write_demo_pki(tmp)
    config = write_demo_config(tmp, pki, endpoint, workers=args.workers)
    # rss_per_inflight_kb needs STALLED handshakes in flight at once, above the default
    # max_inflight (16 per worker); the rates below run 2 x concurrency requests over the
    # workers, at most the default cap per worker with the default arguments (16 pairs, 2
    # workers), so the raised cap does not change them
    config.write_text(config.read_text() + f"max_inflight={STALLED + 28}\n")
    ring = NVMeKeyring.create(name=f"tlshd-bench-{os.getpid()}")
    ring.add_psk(psk_identity("bench-host", "bench-subsys", 1), os.urandom(32))
    figures: dict[str, float] = {}
    with Kernel(endpoint=endpoint) as kernel:
        ns = kernel.add_netns(None)
        log_path = tmp / "agent.log"
        with open(log_path, "w") as log:
            agent = start_agent(config, stderr=log)
        try:
            kernel.wait_for(lambda: kernel.listeners(ns) >= args.workers, 30)
            time.sleep(0.5)
            pids = [agent.pid, *children(agent.pid)]
            figures["idle_rss_mb"] = rss_kb(pids) / 1024
            figures["idle_pss_mb"] = pss_kb(pids) / 1024
            figures["idle_rss_per_process_mb"] = rss_kb(pids) / 1024 / len(pids)
            fds_before = fd_count(pids[1:])
            cpu_before = cpu_s(pids)
            figures["agent_x509_hs_per_s"] = rate(lambda: one_pair(kernel), args.pairs,
                                                  args.concurrency)
            handshakes = 2 * (args.pairs + 1)
            figures["agent_cpu_ms_per_hs"] = 1000 * (cpu_s(pids) - cpu_before) / handshakes
            figures["agent_psk_hs_per_s"] = rate(lambda: psk_pair(kernel, ring), args.pairs,
                                                 args.concurrency)
            figures["rss_per_inflight_kb"] = stalled_rss(kernel, pids)
            kernel.wait_for(lambda: fd_count(pids[1:]) == fds_before, 40)
            figures["fds_leaked"] = fd_count(pids[1:]) - fds_before
            figures.update(ready_to_accept(kernel))
        finally:
            agent.terminate()
            agent.wait(60)
            ring.close()
        figures.update(overhead(log_path.read_text()))
    return figures


def ready_to_accept(kernel: Kernel) -> dict[str, float]:
    submitted = {e.sock: e.ts for e in kernel.events("submit")}
    waits = [(e.ts - submitted[e.sock]) * 1000 for e in kernel.events("cmd_accept")
             if e.sock in submitted]
    return {"ready_to_accept_p50_ms": percentile(waits, 0.5),
            "ready_to_accept_p99_ms": percentile(waits, 0.99)}


def overhead(log: str) -> dict[str, float]:
    """Per successful request: the worker's busy time minus the time inside OpenSSL (the
    agent's own work), and ACCEPT-to-DONE wall time minus OpenSSL time (which also counts
    waiting for the peer and behind the worker's other handshakes)."""
    rows = [(float(total), float(busy), float(tls)) for total, busy, tls in
            re.findall(r"status=0 ([\d.]+)ms ok .*? busy=([\d.]+)ms tls=([\d.]+)ms", log)]
    own = [busy - tls for _total, busy, tls in rows]
    wall = [total - tls for total, _busy, tls in rows]
    return {"overhead_p50_ms": percentile(own, 0.5), "overhead_p99_ms": percentile(own, 0.99),
            "wall_minus_tls_p50_ms": percentile(wall, 0.5),
            "wall_minus_tls_p99_ms": percentile(wall, 0.99), "requests_measured": len(rows)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0, help="ceiling measurement time")
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        figures = agent_figures(args, Path(tmp))
        config_text = (Path(tmp) / "config").read_text()
        figures["ceiling_hs_per_s"] = ceiling(config_text, args.workers, args.seconds)
    figures["ratio_x509_to_ceiling"] = figures["agent_x509_hs_per_s"] / figures["ceiling_hs_per_s"]
    figures["ratio_psk_to_ceiling"] = figures["agent_psk_hs_per_s"] / figures["ceiling_hs_per_s"]
    # CPU per handshake: the ceiling's processes are busy the whole time
    figures["ceiling_cpu_ms_per_hs"] = 1000 * args.workers / figures["ceiling_hs_per_s"]
    figures["cpu_efficiency_vs_ceiling"] = (figures["ceiling_cpu_ms_per_hs"]
                                           / figures["agent_cpu_ms_per_hs"])
    print(f"{'figure':<28} {'value':>12}")
    for key, value in figures.items():
        print(f"{key:<28} {value:>12.2f}")
    for key, value in figures.items():
        print(f"{key}={value:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
