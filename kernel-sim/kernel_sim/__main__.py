"""``kernel-sim``: the simulator's command line.

``kernel-sim demo`` runs kernel-sim in this process with NFS-style consumers and an agent as a
separate process (``python -m tlshd`` unless ``--agent`` names another command line, for
example the reference agent's ``tlshd``, which takes the same ``-s -c FILE`` options), and
prints what each handshake did. The simulator is a library for everything else: tests
start it in-process (``kernel_sim.kernel.Kernel``) next to the consumers they drive.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence

DEFAULT_AGENT = (sys.executable, "-m", "tlshd")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kernel-sim",
        description="A user-space model of the kernel's TLS handshake upcall (the 'handshake' "
                    "generic netlink family, kTLS, NFS and NVMe consumers) for agents to be "
                    "tested on kernels without it.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="real handshakes between kernel-sim's NFS-style "
                                            "consumers through an agent process")
    demo.add_argument("--agent", default=shlex.join(DEFAULT_AGENT),
                      help="the agent's command line, before its '-s -c CONFIG' "
                           "(default: %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from kernel_sim.demo import run_demo  # cryptography: only the demo needs it

        return run_demo(shlex.split(args.agent))
    return 2  # argparse has refused anything else already


if __name__ == "__main__":
    sys.exit(main())
