"""Secure sockets for applications on a real Linux under QEMU: kTLS against user-space
OpenSSL, and ``tlshd wrap``'s connection set-up against a direct TLS connect (issue 17).

    .venv/bin/python bench/app_wrap.py [--kernel 6.12|7.3] [--mib N] [--connects N] [--out DIR]

Boots the real-kernel tier's guest once (scripts/qemu/run-guest.sh) with the ``app_bench``
scenario (scripts/qemu/app-bench.py), which measures both sides of each figure in the same
run, on the same 2 vCPUs:

* bulk throughput of ``--mib`` MiB over a loopback pair that the agent secured (tlshd.app;
  the kernel does the records) and over a pair whose records Python's ssl module does
  (OpenSSL in user space): the medians of three rounds each, alternated, and this process's
  CPU per MiB (sender and receiver are its threads);
* ``--connects`` connections (TCP connect, TLS handshake, one byte each way) from a program
  under ``tlshd wrap`` and from the same program doing its own handshake with Python's ssl.

Prints ``key=value`` lines: the guest's figures, ``throughput_ratio`` (kTLS over user space,
MiB/s), ``cpu_ratio`` (kTLS over user space, CPU per MiB) and ``wrap_setup_ratio`` (wrap over
direct, per connection).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench import print_figures, ratio
from tests.kernel.evidence import read_results

REPO = Path(__file__).resolve().parents[1]
RUN_GUEST = REPO / "scripts" / "qemu" / "run-guest.sh"
FIGURES = ("ktls_mib_s", "userspace_mib_s", "ktls_cpu_ms_per_mib", "userspace_cpu_ms_per_mib",
           "direct_connect_ms", "wrap_connect_ms")


def figures(results: dict[str, str]) -> dict[str, float]:
    """The guest's figures and the ratios, from its ``app_bench.*`` results."""
    got = {key: float(results[f"app_bench.{key}"]) for key in FIGURES}
    return {**got,
            "throughput_ratio": ratio(got["ktls_mib_s"], got["userspace_mib_s"]),
            "cpu_ratio": ratio(got["ktls_cpu_ms_per_mib"], got["userspace_cpu_ms_per_mib"]),
            "wrap_setup_ratio": ratio(got["wrap_connect_ms"], got["direct_connect_ms"])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernel", choices=("6.12", "7.3"), default="7.3")
    parser.add_argument("--mib", type=int, default=32)
    parser.add_argument("--connects", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="tlshd-app-bench-"))
    print(f"app_wrap bench: booting Linux {args.kernel} (QEMU; a few minutes), output {out}",
          file=sys.stderr, flush=True)
    env = dict(os.environ, TLSHD_QEMU_KERNEL=args.kernel)
    proc = subprocess.run(["bash", str(RUN_GUEST), str(out), "app_bench", str(args.mib),
                           str(args.connects)], env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, check=False)
    results = read_results(out / "results") if (out / "results").exists() else {}
    if proc.returncode != 0 or results.get("app_bench.rc") != "0":
        print(proc.stdout[-3000:] + proc.stderr[-3000:], file=sys.stderr)
        print(f"app_wrap bench: the guest failed; see {out}", file=sys.stderr)
        return 1
    print(f"kernel={results.get('global.kernel', '?')} mib={args.mib} "
          f"connects={args.connects}")
    print_figures(figures(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
