"""Kernel behaviour that differs between releases, selectable per simulated kernel.

Each flag names the kernel change it follows (see docs/kernel-sim.md).
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class KernelProfile:
    name: str
    accept_peername: bool = True  # HANDSHAKE_A_ACCEPT_PEERNAME (8), Linux 6.5
    accept_keyring: bool = True  # HANDSHAKE_A_ACCEPT_KEYRING (9), Linux 6.17
    done_status_max: int | None = 4095  # NLA_POLICY_MAX(NLA_U32, MAX_ERRNO), 2026 fix
    # GENL_ADMIN_PERM on DONE: `genl ctrl get name handshake` on Debian's 6.12.117 and 7.3.4
    # shows DONE "requires admin permission" like ACCEPT; 6.12.95 acked DONE without it.
    done_admin_perm: bool = True
    accept_admin_perm: bool = True  # GENL_ADMIN_PERM on ACCEPT: CAP_NET_ADMIN
    net_exit_completes_pending: bool = True  # handshake_net_exit splice fix, 2026
    rekey: bool = True  # kTLS KeyUpdate / EKEYEXPIRED, Linux 6.14
    # Before the 2026 sign fix, kernel-internal failures (DONE without STATUS, a failed
    # ACCEPT, net exit) were passed as -(-errno): consumers saw a positive number.
    legacy_status_sign: bool = False
    # DONE attribute 4, "tag" (a NUL string, repeated), of the posted session-tags series;
    # in no released kernel (6.12 and 7.3 declare DONE 1-3 only: nlctrl GETPOLICY in QEMU)
    done_tags: bool = False

    def internal_status(self, err: int) -> int:
        """What a consumer sees for a kernel-internal failure ``err`` (positive errno)."""
        return err if self.legacy_status_sign else -err


MAINLINE = KernelProfile(name="mainline")
LINUX_7_3 = replace(MAINLINE, name="7.3")  # Debian trixie-backports 7.3.4
LINUX_6_12 = KernelProfile(  # Debian 6.12.95 (bookworm-backports), as measured in QEMU
    name="6.12",
    accept_keyring=False,
    done_status_max=None,
    done_admin_perm=False,
    net_exit_completes_pending=False,
    rekey=False,
    legacy_status_sign=True,
)
LINUX_6_12_117 = replace(LINUX_6_12, name="6.12.117", done_admin_perm=True)  # Debian trixie
TAGS = replace(MAINLINE, name="tags", done_tags=True)  # the posted session-tags series
PROFILES = {p.name: p for p in (MAINLINE, LINUX_7_3, LINUX_6_12, LINUX_6_12_117, TAGS)}
