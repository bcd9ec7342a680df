"""tlshd against the reference agent (ktls-utils' tlshd) on a real Linux under QEMU.

    .venv/bin/python bench/real_kernel.py [--kernel 6.12|7.3] [--cycles N] [--out DIR]
                                          [--groups default|classical] [--privsep on|off]

``--kernel 6.12`` (default): Debian trixie's Linux 6.12 against trixie's ktls-utils 1.0.0;
``--kernel 7.3``: trixie-backports' Linux 7.3 against sid's ktls-utils 1.4.0
(scripts/qemu/ktls-utils-1.4.sh). ``--groups classical`` gives tlshd classical groups only
(one X25519 key share), to show what the post-quantum hybrid costs; the reference keeps
GnuTLS's defaults either way.

Boots the real-kernel tier's guest twice, the same way (scripts/qemu/run-guest.sh, same kernel,
same root, 2 vCPUs, the same accelerator: the first boot's choice is imposed on the second):
once with this checkout's agent, once with the reference. Each boot
plays ``nvme_loop N`` (N NVMe/TCP connect + disconnect cycles: PSK handshakes, 6 per cycle) and
``nfs_loop N`` (N NFSv4.2 ``xprtsec=tls`` mount + umount cycles: an anonymous client and an
x509 server handshake per cycle), then ``nvme_burst 4`` (4 connects at once: the handshakes of
all their queues together; ``burst_ratio`` is tlshd's wall time over the reference's, issue
16's target <= 0.7). Every time comes from the kernel's tracepoints
(``handshake_submit`` -> ``handshake_cmd_accept`` -> ``handshake_cmd_done``), not from an agent.

Prints a table, then ``key=value`` lines: per agent and kind (psk, x509) the median and p90
submit->accept and accept->done in ms, the agent's CPU per handshake (every process of the
agent, the reference's forked children included: scripts/qemu/agent-cost.py) and its peak
summed RSS, and ``accept_to_done_ratio_{psk,x509}`` / ``cpu_ratio_{psk,x509}``: tlshd's over
the reference's (issue 16's targets: accept->done <= 0.7, CPU <= 1.0).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.kernel.evidence import Timing, read_results, scenario_evidence

REPO = Path(__file__).resolve().parents[1]
RUN_GUEST = REPO / "scripts" / "qemu" / "run-guest.sh"
AGENTS = ("tlshd", "reference")
KINDS = {"psk": "nvme_loop", "x509": "nfs_loop"}
BURST = 4  # NVMe/TCP connects at once: each an admin queue and one I/O queue per vCPU


def boot(agent: str, out: Path, cycles: int, accel: str, kernel: str, groups: str,
         privsep: str) -> str:
    """One boot with ``agent``; returns the accelerator it ran under."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TLSHD_GUEST_AGENT=agent, TLSHD_QEMU_ACCEL=accel,
               TLSHD_QEMU_KERNEL=kernel, TLSHD_GUEST_GROUPS=groups, TLSHD_GUEST_PRIVSEP=privsep,
               TLSHD_GUEST_REFERENCE="1.4" if kernel == "7.3" else "")
    scenarios = ["nvme_loop", str(cycles), "nfs_loop", str(cycles), "nvme_burst", str(BURST)]
    proc = subprocess.run(["bash", str(RUN_GUEST), str(out), *scenarios], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{agent}: guest failed (rc={proc.returncode}), see {out}/console.log\n"
                         + proc.stderr[-2000:])
    return read_results(out / "host-results").get("accel", "?")


def timings(out: Path, scenario: str) -> list[Timing]:
    return [t for t in all_timings(out, scenario) if t.status == 0]


def all_timings(out: Path, scenario: str) -> list[Timing]:
    return list(scenario_evidence(out, scenario).timings)


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--kernel", choices=("6.12", "7.3"), default="6.12")
    parser.add_argument("--groups", choices=("default", "classical"), default="default")
    parser.add_argument("--privsep", choices=("on", "off"), default="on",
                        help="tlshd's [agent] privsep (the default is on)")
    args = parser.parse_args()
    base = args.out or Path(tempfile.mkdtemp(prefix="tlshd-real-bench-"))
    figures: dict[str, float] = {}
    rows = []
    accel = os.environ.get("TLSHD_QEMU_ACCEL", "auto")
    for agent in AGENTS:
        out = base / agent
        used = boot(agent, out, args.cycles, accel, args.kernel,
                    "" if args.groups == "default" else args.groups,
                    "off" if args.privsep == "off" else "")
        if accel not in ("auto", used):
            raise SystemExit(f"{agent} ran under {used}, the other agent under {accel}")
        accel = used  # the second agent boots under the first one's accelerator
        res = read_results(out / "results")
        for kind, scenario in KINDS.items():
            t = timings(out, scenario)
            if not t:
                raise SystemExit(f"{agent}: no completed {kind} handshake in {out / scenario}")
            accept = statistics.median(x.submit_to_accept_ms for x in t)
            done = statistics.median(x.accept_to_done_ms for x in t)
            figures[f"{agent}_{kind}_submit_to_accept_ms"] = accept
            figures[f"{agent}_{kind}_accept_to_done_ms"] = done
            figures[f"{agent}_{kind}_accept_to_done_p90_ms"] = _p90([x.accept_to_done_ms
                                                                     for x in t])
            figures[f"{agent}_{kind}_handshakes"] = len(t)
            cpu_s = float(res.get(f"{scenario}.agent_cpu_s", "nan"))
            # every handshake of the loop, the failed ones too, ran on the agent's CPU
            figures[f"{agent}_{kind}_cpu_ms_per_hs"] = 1000 * cpu_s / len(all_timings(out,
                                                                                     scenario))
            figures[f"{agent}_{kind}_peak_rss_mb"] = float(
                res.get(f"{scenario}.agent_peak_rss_kb", "nan")) / 1024
            rows.append((agent, kind, len(t), res.get(f"{scenario}.cycles_ok", "?"), accept, done,
                         max(x.accept_to_done_ms for x in t)))
        figures[f"{agent}_burst_seconds"] = float(res.get("nvme_burst.seconds", "nan"))
        figures[f"{agent}_burst_connects_ok"] = float(res.get("nvme_burst.connects_ok", "nan"))
        figures[f"{agent}_burst_handshakes"] = len(timings(out, "nvme_burst"))
        figures[f"{agent}_burst_cpu_s"] = float(res.get("nvme_burst.agent_cpu_s", "nan"))
    figures["burst_ratio"] = figures["tlshd_burst_seconds"] / figures["reference_burst_seconds"]
    for kind in KINDS:
        figures[f"accept_to_done_ratio_{kind}"] = (figures[f"tlshd_{kind}_accept_to_done_ms"]
                                                   / figures[f"reference_{kind}_accept_to_done_ms"])
        figures[f"cpu_ratio_{kind}"] = (figures[f"tlshd_{kind}_cpu_ms_per_hs"]
                                        / figures[f"reference_{kind}_cpu_ms_per_hs"])
    print(f"Linux {args.kernel} under QEMU ({accel}), {args.cycles} cycles each, tlshd groups "
          f"{args.groups}, privsep {args.privsep}; times from the handshake tracepoints; "
          f"output in {base}")
    print(f"{'agent':<10} {'kind':<5} {'handshakes':>10} {'cycles ok':>9} "
          f"{'submit->accept':>15} {'accept->done':>13} {'max':>8}")
    for agent, kind, n, ok, accept, done, worst in rows:
        print(f"{agent:<10} {kind:<5} {n:>10} {ok:>9} {accept:>12.1f} ms {done:>10.1f} ms "
              f"{worst:>6.1f} ms  CPU {figures[f'{agent}_{kind}_cpu_ms_per_hs']:.1f} ms/hs  "
              f"peak {figures[f'{agent}_{kind}_peak_rss_mb']:.1f} MB")
    for key, value in figures.items():
        print(f"{key}={value:.3f}" if isinstance(value, float) else f"{key}={value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
