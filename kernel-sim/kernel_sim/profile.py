"""Kernel behaviour that differs between releases, selectable per simulated kernel.

Each flag names the kernel change it follows (see docs/kernel-sim.md).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KernelProfile:
    name: str
    accept_peername: bool = True  # HANDSHAKE_A_ACCEPT_PEERNAME (8), Linux 6.5
    accept_keyring: bool = True  # HANDSHAKE_A_ACCEPT_KEYRING (9), Linux 6.17
    done_status_max: int | None = 4095  # NLA_POLICY_MAX(NLA_U32, MAX_ERRNO), 2026 fix
    done_admin_perm: bool = False  # one stable variant had GENL_ADMIN_PERM on DONE
    accept_admin_perm: bool = True  # GENL_ADMIN_PERM on ACCEPT: CAP_NET_ADMIN
    net_exit_completes_pending: bool = True  # handshake_net_exit splice fix, 2026
    rekey: bool = True  # kTLS KeyUpdate / EKEYEXPIRED, Linux 6.14
    # Before the 2026 sign fix, kernel-internal failures (DONE without STATUS, a failed
    # ACCEPT, net exit) were passed as -(-errno): consumers saw a positive number.
    legacy_status_sign: bool = False

    def internal_status(self, err: int) -> int:
        """What a consumer sees for a kernel-internal failure ``err`` (positive errno)."""
        return err if self.legacy_status_sign else -err


MAINLINE = KernelProfile(name="mainline")
LINUX_6_12 = KernelProfile(
    name="6.12",
    accept_keyring=False,
    done_status_max=None,
    net_exit_completes_pending=False,
    rekey=False,
    legacy_status_sign=True,
)
PROFILES = {p.name: p for p in (MAINLINE, LINUX_6_12)}
