"""The agent against OpenSSL itself, measured in one run on this machine (issue 16).

    .venv/bin/python bench/bench.py [--seconds S] [--pairs N] [--concurrency C] [--workers W]
                                    [--groups LIST] [--privsep on|off]

Prints a table, then ``key=value`` figures. The headline is CPU per handshake side:

* ``agent_cpu_ms_x509`` / ``agent_cpu_ms_psk``: utime + stime of every agent process
  (supervisor, workers and, with privilege separation, their handshake processes; /proc) over
  N pairs through the whole path (kernel-sim consumer -> READY -> ACCEPT -> handshake ->
  key installation -> DONE), divided by the handshake sides the agent ran (2 per pair);
* ``ceiling_cpu_ms_x509`` / ``ceiling_cpu_ms_psk``: the same handshakes (the agent's own
  contexts: certificates, groups, suites; for PSK its PSK contexts and session callbacks)
  done by pyOpenSSL in memory, no agent, no kernel: process CPU per side;
* ``cpu_ratio_x509`` / ``cpu_ratio_psk``: ceiling over agent (1.0: the agent costs only what
  OpenSSL costs);
* ``harness_cpu_ms_x509`` / ``_psk``: this process's CPU per side meanwhile (kernel-sim, its
  consumers and the TLS peers), which the CPU figures above leave out;
* ``overhead_cpu_p50_ms`` / ``_p99_ms`` (x509), ``psk_overhead_cpu_p50_ms`` / ``_p99_ms``:
  per request, the CPU of the process that ran it outside OpenSSL, from the ACCEPT reply to
  DONE's answer (``tlshd status``'s ``request_cpu_ms``); ``request_cpu_p50_ms`` / ``_p99_ms``
  the same with OpenSSL; ``accept_to_done_p50_ms`` / ``_p99_ms``: wall time (kernel-sim's
  trace);
* ``idle_rss_mb``, ``idle_pss_mb``, ``idle_uss_mb``: summed over the agent's processes (PSS
  counts a shared page once, USS only the pages a process alone has), and per role
  (``_supervisor``, ``_workers``, ``_handshake``);
* ``inflight_kb``: PSS growth per stalled handshake in flight (100 at once);
  ``rss_per_inflight_kb`` the same in RSS;
* ``fds_leaked``: the workers' fds before and after everything;
* secondary, wall clock: ``agent_x509_hs_per_s`` / ``agent_psk_hs_per_s`` against
  ``ceiling_hs_per_s`` / ``ceiling_psk_hs_per_s`` (``rate_ratio_x509`` / ``_psk``), with
  ``harness_share_x509`` / ``_psk``: the harness's part of all CPU used meanwhile, which
  caps what the wall-clock ratio can show on a 2-core machine.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import multiprocessing
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
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
from tlshd.handshake import _psk
from tlshd.handshake.secrets import HashAlg
from tlshd.netlink.messages import AcceptReply, Header
from tlshd.netlink.spec import AuthMode, MsgType

STALLED = 100
PSK_IDENTITY = b"NVMe0R01 bench-host bench-subsys"


# --- the ceiling -------------------------------------------------------------------------


def _reply(message_type: MsgType) -> AcceptReply:
    return AcceptReply(Header(0, 0, 1, 0), 0, message_type, AuthMode.X509, "localhost", None,
                       None, (), None, ())


def _ceiling_worker(config_text: str, seconds: float, kind: str,
                    out: multiprocessing.Queue) -> None:
    """Client/server pairs over memory BIOs with the agent's own contexts, for ``seconds``:
    (handshake sides, CPU seconds, wall seconds)."""
    contexts = Contexts.from_config(parse_config(config_text))
    if kind == "psk":
        client_ctx, server_ctx = contexts.psk_client[HashAlg.SHA256], contexts.psk_server[
            HashAlg.SHA256]
    else:
        client_ctx = contexts(_reply(MsgType.CLIENTHELLO))
        server_ctx = contexts(_reply(MsgType.SERVERHELLO))
    key = os.urandom(32)
    for _ in range(20):  # warm-up
        _memory_pair(client_ctx, server_ctx, key if kind == "psk" else None)
    done, cpu0, wall0 = 0, time.process_time(), time.perf_counter()
    while time.perf_counter() < wall0 + seconds:
        _memory_pair(client_ctx, server_ctx, key if kind == "psk" else None)
        done += 2
    out.put((done, time.process_time() - cpu0, time.perf_counter() - wall0))


def _memory_pair(client_ctx: SSL.Context, server_ctx: SSL.Context,
                 psk: bytes | None = None) -> None:
    client, server = SSL.Connection(client_ctx), SSL.Connection(server_ctx)
    if psk is not None:  # as the agent's chooser attaches a key to each side
        for conn in (client, server):
            _psk.attach(conn, PSK_IDENTITY, psk, _psk.SUITE_SHA256)
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
    for conn in (client, server):
        _psk.detach(conn)


def ceiling(config_text: str, processes: int, seconds: float, kind: str) -> dict[str, float]:
    queue: multiprocessing.Queue = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=_ceiling_worker,
                                     args=(config_text, seconds, kind, queue))
             for _ in range(processes)]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=seconds + 60) for _ in procs]
    for proc in procs:
        proc.join()
    sides = sum(r[0] for r in results)
    return {"cpu_ms": 1000 * sum(r[1] for r in results) / sides,
            "hs_per_s": sum(r[0] / r[2] for r in results)}


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


def uss_kb(pids: list[int]) -> int:
    """Unique set size: the pages only that process has (what killing it would free)."""
    return (_proc_kb(pids, "smaps_rollup", "Private_Clean")
            + _proc_kb(pids, "smaps_rollup", "Private_Dirty"))


def roles(supervisor: int) -> dict[str, list[int]]:
    """The supervisor, its workers (monitors, with privilege separation) and their children
    (the confined handshake processes)."""
    workers = _direct_children(supervisor)
    return {"supervisor": [supervisor], "workers": workers,
            "handshake": [c for w in workers for c in _direct_children(w)]}


def _direct_children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def harness_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # this process: kernel-sim, consumers, peers
    return usage.ru_utime + usage.ru_stime


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
    """The CPU time of these processes, every thread: the scheduler's nanoseconds
    (/proc/PID/task/TID/schedstat), else utime + stime in clock ticks (/proc/PID/stat,
    10 ms steps: a short run can read 0)."""
    total = 0.0
    for pid in pids:
        try:
            total += sum(int((task / "schedstat").read_text().split()[0])
                         for task in Path(f"/proc/{pid}/task").iterdir()) / 1e9
        except (OSError, ValueError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


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


def stalled_rss(kernel: Kernel, agent_pids: list[int]) -> tuple[float, float]:
    """RSS and PSS growth per in-flight handshake: clients whose servers never answer."""
    before, pss_before = rss_kb(agent_pids), pss_kb(agent_pids)
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
    pss_grown = (pss_kb(agent_pids) - pss_before) / STALLED
    for sock in (*socks, *peers, listener):  # the agent sees the peers go and ends them
        sock.close()
    return grown, pss_grown


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, or NaN where the denominator measured nothing (CPU time from
    /proc counts in clock ticks, 10 ms: a short run can read 0)."""
    return numerator / denominator if denominator else math.nan


def print_figures(figures: dict[str, float]) -> None:
    """Every figure as ``key=value``, one per line, the form the smoke tests and docs read."""
    for key, value in figures.items():
        print(f"{key}={value:.3f}")


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else 0.0


def agent_figures(args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    endpoint = f"tlshd-bench-{os.getpid()}"
    from kernel_sim.demo import start_agent

    pki = write_demo_pki(tmp)
    config = write_demo_config(tmp, pki, endpoint, workers=args.workers)
    # inflight_kb needs STALLED handshakes in flight at once, above the default
    # max_inflight (16 per worker); the rates below run 2 x concurrency requests over the
    # workers, at most the default cap per worker with the default arguments (16 pairs, 2
    # workers), so the raised cap does not change them
    text = config.read_text() + f"max_inflight={STALLED + 28}\nlog_success=false\n"
    if args.privsep == "off":
        text += "privsep=false\n"
    if args.groups:
        text = text.replace("[authenticate]\n", f"[authenticate]\ngroups={args.groups}\n", 1) \
            if "[authenticate]\n" in text else text + f"\n[authenticate]\ngroups={args.groups}\n"
    config.write_text(text)
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
            by_role = roles(agent.pid)
            pids = [pid for group in by_role.values() for pid in group]
            figures.update(idle_memory(by_role))
            fds_before = fd_count(pids[1:])
            one_pair(kernel)  # warm: the first request's lazy set-up is not a handshake's cost
            psk_pair(kernel, ring)
            for kind, pair in (("x509", lambda: one_pair(kernel)),
                               ("psk", lambda: psk_pair(kernel, ring))):
                figures.update(measure(kind, pair, pids, args))
            figures.update(request_cpu(config))
            figures.update(ready_to_accept(kernel))
            figures["rss_per_inflight_kb"], figures["inflight_kb"] = stalled_rss(kernel, pids)
            kernel.wait_for(lambda: fd_count(pids[1:]) == fds_before, 40)
            figures["fds_leaked"] = fd_count(pids[1:]) - fds_before
        finally:
            agent.terminate()
            agent.wait(60)
            ring.close()
    return figures


def idle_memory(by_role: dict[str, list[int]]) -> dict[str, float]:
    pids = [pid for group in by_role.values() for pid in group]
    out = {"idle_rss_mb": rss_kb(pids) / 1024, "idle_pss_mb": pss_kb(pids) / 1024,
           "idle_uss_mb": uss_kb(pids) / 1024, "idle_processes": float(len(pids))}
    for role, group in by_role.items():
        out[f"idle_pss_mb_{role}"] = pss_kb(group) / 1024
        out[f"idle_uss_mb_{role}"] = uss_kb(group) / 1024
    return out


def measure(kind: str, pair: Callable[[], object], pids: list[int],
            args: argparse.Namespace) -> dict[str, float]:
    """N pairs of one kind: the agent's CPU and the harness's per handshake side, the rate."""
    agent0, harness0 = cpu_s(pids), harness_cpu_s()
    started = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        list(pool.map(lambda _: pair(), range(args.pairs)))
    wall = time.perf_counter() - started
    sides = 2 * args.pairs
    agent, harness = cpu_s(pids) - agent0, harness_cpu_s() - harness0
    return {f"agent_cpu_ms_{kind}": 1000 * agent / sides,
            f"harness_cpu_ms_{kind}": 1000 * harness / sides,
            f"harness_share_{kind}": ratio(harness, harness + agent),
            f"agent_{kind}_hs_per_s": sides / wall}


def request_cpu(config: Path) -> dict[str, float]:
    """Per-request CPU from the agent itself (``tlshd status --json``)."""
    out = subprocess.run([sys.executable, "-m", "tlshd", "status", "--json", "-c", str(config)],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    by_auth = json.loads(out)["request_cpu_ms"]
    figures: dict[str, float] = {}
    for auth, prefix in (("X509", ""), ("PSK", "psk_")):
        summary = by_auth.get(auth, {})
        figures[f"{prefix}overhead_cpu_p50_ms"] = summary.get("own_p50", 0.0)
        figures[f"{prefix}overhead_cpu_p99_ms"] = summary.get("own_p99", 0.0)
        figures[f"{prefix}request_cpu_p50_ms"] = summary.get("p50", 0.0)
        figures[f"{prefix}request_cpu_p99_ms"] = summary.get("p99", 0.0)
    return figures


def ready_to_accept(kernel: Kernel) -> dict[str, float]:
    submitted = {e.sock: e.ts for e in kernel.events("submit")}
    accepted = {e.sock: e.ts for e in kernel.events("cmd_accept")}
    waits = [(accepted[s] - submitted[s]) * 1000 for s in accepted if s in submitted]
    done = [(e.ts - accepted[e.sock]) * 1000 for e in kernel.events("cmd_done")
            if e.sock in accepted]
    return {"ready_to_accept_p50_ms": percentile(waits, 0.5),
            "ready_to_accept_p99_ms": percentile(waits, 0.99),
            "accept_to_done_p50_ms": percentile(done, 0.5),
            "accept_to_done_p99_ms": percentile(done, 0.99)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0, help="ceiling measurement time")
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--groups", default="", help="[authenticate] groups for both")
    parser.add_argument("--privsep", choices=("on", "off"), default="on",
                        help="[agent] privsep (on: the default, as root)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        figures = agent_figures(args, Path(tmp))
        config_text = (Path(tmp) / "config").read_text()
        for kind in ("x509", "psk"):
            result = ceiling(config_text, args.workers, args.seconds, kind)
            figures[f"ceiling_cpu_ms_{kind}"] = result["cpu_ms"]
            figures[f"ceiling_{'' if kind == 'x509' else 'psk_'}hs_per_s"] = result["hs_per_s"]
    for kind in ("x509", "psk"):
        figures[f"cpu_ratio_{kind}"] = ratio(figures[f"ceiling_cpu_ms_{kind}"],
                                             figures[f"agent_cpu_ms_{kind}"])
    figures["rate_ratio_x509"] = ratio(figures["agent_x509_hs_per_s"], figures["ceiling_hs_per_s"])
    figures["rate_ratio_psk"] = ratio(figures["agent_psk_hs_per_s"],
                                      figures["ceiling_psk_hs_per_s"])
    print(f"{'figure':<28} {'value':>12}")
    for key, value in figures.items():
        print(f"{key:<28} {value:>12.3f}")
    print_figures(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
