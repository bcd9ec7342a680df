"""One scenario suite, two kernels: what each scenario must show, whichever kernel runs it.

tests/kernel/test_sim_scenarios.py runs these against kernel-sim's consumers (Linux 6.12
profile), tests/kernel/test_real_kernel.py reads what scripts/qemu/guest.sh saw Linux 6.12's own
consumers do under QEMU. Both compare against the same :data:`SCENARIOS`: the errno the
consumer's user sees (mount(8), a write to /dev/nvme-fabrics) and the kernel's evidence
(tracepoints, kTLS counters). A difference between the two kernels is a kernel-sim bug
(docs/kernel-sim.md lists the ones found).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from tests.kernel.evidence import Evidence

# with 2 CPUs the NVMe host opens an admin queue and 2 I/O queues: 3 TCP connections, each with
# a client (host) and a server (target) handshake
NVME_QUEUES = 3


@dataclass(frozen=True)
class Expect:
    consumer_errno: str  # "0", or the errno's name the consumer's user sees
    statuses: tuple[int, ...] = ()  # handshake_complete statuses
    submit_errors: tuple[int, ...] = ()
    notify_errors: tuple[int, ...] = ()
    ktls_installed: int = 0

    def check(self, consumer_errno: str, evidence: Evidence) -> list[str]:
        """What differs from the expectation (empty when the scenario passed)."""
        problems = []
        if consumer_errno != self.consumer_errno:
            problems.append(f"consumer errno {consumer_errno}, expected {self.consumer_errno}")
        if evidence.statuses != self.statuses:
            problems.append(f"complete statuses {evidence.statuses}, expected {self.statuses}")
        if evidence.submit_errors != self.submit_errors:
            problems.append(f"submit errors {evidence.submit_errors}, "
                            f"expected {self.submit_errors}")
        if evidence.notify_errors != self.notify_errors:
            problems.append(f"notify errors {evidence.notify_errors}, "
                            f"expected {self.notify_errors}")
        handshakes = len(self.statuses)
        if (evidence.submitted, evidence.accepted, evidence.done) != (handshakes,) * 3:
            problems.append(f"submit/accept/done {evidence.submitted}/{evidence.accepted}/"
                            f"{evidence.done}, expected {handshakes} each")
        if evidence.ktls_installed != self.ktls_installed:
            problems.append(f"{evidence.ktls_installed} kTLS sockets installed, "
                            f"expected {self.ktls_installed}")
        return problems


EACCES, ESRCH = errno.EACCES, errno.ESRCH
SCENARIOS: dict[str, Expect] = {
    # NVMe/TCP, PSK: every queue a host (client) and a target (server) handshake
    "nvme_psk": Expect("0", (0,) * 2 * NVME_QUEUES, ktls_installed=2 * NVME_QUEUES),
    # a SHA-384 PSK (NVMe0R02) beside it: the host prefers it, the handshakes use it
    "nvme_psk_sha384": Expect("0", (0,) * 2 * NVME_QUEUES, ktls_installed=2 * NVME_QUEUES),
    # no agent: the host's and the target's READY finds no listener, both submits fail with
    # ESRCH and nothing stays queued
    "nvme_no_agent": Expect("ESRCH", submit_errors=(-ESRCH, -ESRCH),
                            notify_errors=(-ESRCH, -ESRCH)),
    # NFSv4.2: the client's (anonymous or x509) and the server's handshake
    "nfs_tls": Expect("0", (0, 0), ktls_installed=2),
    "nfs_mtls": Expect("0", (0, 0), ktls_installed=2),
    # a mount without xprtsec of a TLS-only export: no handshake at all, the server refuses
    "nfs_plain_refused": Expect("EPERM"),
    # xprtsec=tls against an mtls export: both handshakes succeed, but the client presented no
    # certificate (peer not authenticated), so the export refuses the mount
    "nfs_tls_on_mtls": Expect("EPERM", (0, 0), ktls_installed=2),
    # the server's certificate is from a CA the client does not trust: the agent's client side
    # rejects it (DONE status EACCES), its server side gets the unknown_ca alert (EACCES too)
    "nfs_untrusted_ca": Expect("EACCES", (-EACCES, -EACCES)),
}
