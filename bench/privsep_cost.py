"""What privilege separation costs per handshake, measured in one run.

    .venv/bin/python bench/privsep_cost.py [--rounds R] [--pairs N] [--concurrency C]

Alternates agents with ``[agent] privsep=true`` and ``=false`` (R rounds each, the same
kernel-sim, the same certificates and keys) and measures, per round, the CPU of every agent
process (supervisor, workers and, separated, their handshake processes: utime + stime from
/proc) over N x509 pairs and then N PSK pairs (NVMe-style, keys in a keyring), and the pairs'
rate. Prints the medians per mode and ``key=value`` figures:

* ``cpu_ms_{on,off}`` (x509, per handshake side), ``psk_cpu_ms_{on,off}``;
* ``cpu_ratio`` / ``psk_cpu_ratio``: separated over not (1.0: no cost);
* ``hs_per_s_{on,off}``, ``rate_ratio``, ``psk_rate_ratio``; ``pss_mb_{on,off}`` (idle).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench import children, cpu_s, print_figures, psk_pair, pss_kb, rate, ratio
from bench.bench_agent import one_pair
from kernel_sim.demo import start_agent, write_demo_config, write_demo_pki
from kernel_sim.kernel import Kernel, NetNS
from kernel_sim.nvme import NVMeKeyring, psk_identity


def one_round(kernel: Kernel, ns: NetNS, config: Path, ring: NVMeKeyring,
              args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    with open(tmp / "agent.log", "a") as log:
        agent = start_agent(config, stderr=log)
    try:
        kernel.wait_for(lambda: kernel.listeners(ns) >= args.workers, 30)
        time.sleep(0.3)
        pids = [agent.pid, *children(agent.pid)]
        one_pair(kernel)  # warm: contexts, first imports
        out = {"pss_mb": pss_kb(pids) / 1024}
        before = cpu_s(pids)
        out["hs_per_s"] = rate(lambda: one_pair(kernel), args.pairs, args.concurrency)
        out["cpu_ms"] = 1000 * (cpu_s(pids) - before) / (2 * (args.pairs + 1))
        before = cpu_s(pids)
        out["psk_hs_per_s"] = rate(lambda: psk_pair(kernel, ring), args.pairs, args.concurrency)
        out["psk_cpu_ms"] = 1000 * (cpu_s(pids) - before) / (2 * (args.pairs + 1))
        return out
    finally:
        agent.terminate()
        agent.wait(60)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("privsep_cost: privilege separation needs root", file=sys.stderr)
        return 1
    endpoint = f"tlshd-bench-privsep-{os.getpid()}"
    results: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
    with tempfile.TemporaryDirectory() as name, Kernel(endpoint=endpoint) as kernel:
        tmp = Path(name)
        ns = kernel.add_netns(None)
        pki = write_demo_pki(tmp)
        base = write_demo_config(tmp, pki, endpoint, workers=args.workers).read_text()
        configs = {}
        for mode, value in (("on", "true"), ("off", "false")):
            configs[mode] = tmp / f"config-{mode}"
            configs[mode].write_text(f"{base}privsep={value}\nlog_success=false\n")
        ring = NVMeKeyring.create(name=f"tlshd-bench-privsep-{os.getpid()}")
        ring.add_psk(psk_identity("bench-host", "bench-subsys", 1), os.urandom(32))
        try:
            for _ in range(args.rounds):
                for mode in ("on", "off"):
                    results[mode].append(one_round(kernel, ns, configs[mode], ring, args, tmp))
        finally:
            ring.close()
    figures: dict[str, float] = {}
    for mode, rounds in results.items():
        for name in ("cpu_ms", "psk_cpu_ms", "hs_per_s", "psk_hs_per_s", "pss_mb"):
            figures[f"{name}_{mode}"] = statistics.median(r[name] for r in rounds)
    figures["cpu_ratio"] = ratio(figures["cpu_ms_on"], figures["cpu_ms_off"])
    figures["psk_cpu_ratio"] = ratio(figures["psk_cpu_ms_on"], figures["psk_cpu_ms_off"])
    figures["rate_ratio"] = ratio(figures["hs_per_s_on"], figures["hs_per_s_off"])
    figures["psk_rate_ratio"] = ratio(figures["psk_hs_per_s_on"], figures["psk_hs_per_s_off"])
    print_figures(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
