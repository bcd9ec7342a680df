"""The scenario suite on Linux 6.12's own NVMe/TCP and NFS consumers, under QEMU.

Marker ``qemu``: deselected by the default addopts, run by ``scripts/test`` (and so by CI) with
``pytest -m qemu tests/kernel``. Needs root, x86-64 and, on the first run, the package
registries: scripts/qemu/run-guest.sh downloads Debian's 6.12 kernel, builds a trixie root
(make-rootfs.sh) and boots once under QEMU/TCG; scripts/qemu/guest.sh plays every scenario
with this checkout's agent. The guest writes ``RESULT scenario.key=value`` lines, tracefs and
/proc/net/tls_stat snapshots; these tests read them and compare with tests/kernel/scenarios.py,
exactly as test_sim_scenarios.py does for kernel-sim.
"""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.kernel.evidence import Evidence, parse_tls_stat, read_results, scenario_evidence
from tests.kernel.scenarios import NVME_QUEUES, SCENARIOS

pytestmark = pytest.mark.qemu

REPO = Path(__file__).resolve().parents[2]
RUN_GUEST = REPO / "scripts" / "qemu" / "run-guest.sh"
# the no-agent and raw-agent scenarios stop the agent: they go last
ORDER = ["nvme_psk", "nvme_psk_sha384", "nfs_tls", "nfs_mtls", "nfs_plain_refused",
         "nfs_tls_on_mtls", "nfs_untrusted_ca", "nvme_done_status", "nvme_done_noadmin",
         "nvme_no_agent"]


@dataclass
class Guest:
    out: Path
    results: dict[str, str]  # "scenario.key": value

    def r(self, scenario: str, key: str) -> str:
        return self.results.get(f"{scenario}.{key}", "<missing>")

    def evidence(self, scenario: str) -> Evidence:
        return scenario_evidence(self.out, scenario)

    def agent_log(self) -> str:
        return "".join(p.read_text() for p in sorted(self.out.glob("agent-*.log")))


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Guest:
    if os.geteuid() != 0:
        pytest.skip("the QEMU tier needs root")
    if platform.machine() != "x86_64":
        pytest.skip("the QEMU tier boots Debian's amd64 kernel")
    out = tmp_path_factory.mktemp("qemu-out")
    proc = subprocess.run(
        ["bash", str(RUN_GUEST), str(out), *ORDER],
        stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=int(os.environ.get("TLSHD_QEMU_TIMEOUT", "600")) * 2 + 1800, check=False,
    )
    guest = Guest(out, read_results(out / "results"))
    assert guest.r("global", "done") == "yes", (
        f"guest script did not finish (rc={proc.returncode}); console: {out / 'console.log'}\n"
        + proc.stderr[-4000:]
    )
    report = Path(os.environ.get("TLSHD_QEMU_REPORT", REPO / "var" / "qemu-report.txt"))
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(timing_report(guest))
    return guest


def timing_report(guest: Guest) -> str:
    """Per-handshake times from the kernel's tracepoints, a line a scenario."""
    host = read_results(guest.out / "host-results")
    tries = [k for k in host if k.startswith("boot_try_")]
    lines = [f"accelerator: {host.get('accel', '?')}, boots: {len(tries)}"
             + (" (the first did not finish: see console.try1.log)" if len(tries) > 1 else ""),
             "scenario            handshakes  submit->accept ms (median)  accept->done ms "
             "(median, max)"]
    for name in ORDER:
        if not (guest.out / name / "trace.txt").exists():
            continue
        t = guest.evidence(name).timings
        if not t:
            lines.append(f"{name:<20}{0:>10}")
            continue
        acc = sorted(x.submit_to_accept_ms for x in t)
        done = sorted(x.accept_to_done_ms for x in t)
        lines.append(f"{name:<20}{len(t):>10}  {acc[len(acc) // 2]:>26.1f}  "
                     f"{done[len(done) // 2]:>14.1f}, {done[-1]:.1f}")
    return "\n".join(lines) + "\n"


def test_kernel_modules_and_family(guest: Guest) -> None:
    assert read_results(guest.out / "host-results")["accel"] in ("kvm", "tcg")
    assert guest.r("global", "kernel").startswith("6.12.")
    for m in ("tls", "nvme-keyring", "nvme-tcp", "nvmet", "nvmet-tcp", "nfsd", "nfs", "brd"):
        assert guest.r("global", f"modprobe_{m}") == "0", m
    assert guest.r("global", "genl_handshake") == "ok"
    assert guest.r("global", "tracefs") == "ok"
    assert guest.r("global", "agent_ready") != "no", guest.agent_log()


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario_on_the_real_kernel(guest: Guest, name: str) -> None:
    assert guest.r(name, "done") == "yes"
    problems = SCENARIOS[name].check(guest.r(name, "consumer_errno"), guest.evidence(name))
    assert problems == [], guest.agent_log()


def test_every_handshake_is_timed_from_the_tracepoints(guest: Guest) -> None:
    for name, expect in SCENARIOS.items():
        timings = guest.evidence(name).timings
        assert len(timings) == len(expect.statuses), name
        assert all(t.submit_to_accept_ms >= 0 and t.accept_to_done_ms > 0 for t in timings)


@pytest.mark.parametrize("name", ["nvme_psk", "nvme_psk_sha384"])
def test_nvme_controller_io_and_disconnect(guest: Guest, name: str) -> None:
    assert guest.r("nvme_psk", "nvmet_tsas") == "tls1.3"  # the port, set up once
    assert guest.r("nvme_psk", "nvmet_treq") == "required"
    assert guest.r(name, "ctrl_state") == "live"
    assert guest.r(name, "ctrl_queue_count") == str(NVME_QUEUES)
    assert guest.r(name, "dd_write_rc") == "0"
    assert guest.r(name, "dd_read_rc") == "0"
    assert guest.r(name, "data_identical") == "yes"  # 8 MiB, O_DIRECT, through kTLS
    assert guest.r(name, "disconnect_rc") == "0"
    connected = parse_tls_stat("\n".join(
        item.replace(":", " ") for item in guest.r(name, "tls_stat_connected").split(",")))
    assert connected["TlsCurrTxSw"] >= 2 * NVME_QUEUES  # all queues on kTLS while connected


@pytest.mark.parametrize("name, xprtsec", [("nfs_tls", "tls"), ("nfs_mtls", "mtls")])
def test_nfs_files_cross_both_ways(guest: Guest, name: str, xprtsec: str) -> None:
    assert guest.r(name, "mount_proto") == f"vers=4.2,xprtsec={xprtsec}"
    assert guest.r(name, "server_sees_client") == "yes"
    assert guest.r(name, "client_sees_server") == "yes"
    assert guest.r(name, "umount_rc") == "0"


def test_agent_log_matches_the_kernel(guest: Guest) -> None:
    log = guest.agent_log()
    assert "Traceback" not in log
    ok = [line for line in log.splitlines() if " status=0 " in line and " ok " in line]
    psk = [line for line in ok if "auth=PSK" in line]
    assert len(psk) == 2 * 2 * NVME_QUEUES, log  # nvme_psk and nvme_psk_sha384
    assert sum("role=server auth=PSK" in line for line in psk) == 2 * NVME_QUEUES
    sha384 = guest.r("nvme_psk_sha384", "psk_sha384_serial")
    with384 = [line for line in psk if f"psk={sha384}:'NVMe0R02 " in line]
    assert len(with384) == 2 * NVME_QUEUES, log  # the host chose the SHA-384 PSK, both sides
    assert all("cipher=TLS_AES_256_GCM_SHA384" in line for line in with384)
    assert guest.r("nvme_psk_sha384", "psk_sha384_unlinked").strip() == "0"
    # nfs_tls, nfs_mtls, nfs_tls_on_mtls: a client and a server handshake each
    assert sum("role=client auth=UNAUTH peer=127.0.0.1" in line for line in ok) == 2
    assert sum("role=client auth=X509 peer=127.0.0.1" in line for line in ok) == 1
    rejected = [line for line in log.splitlines() if "status=13" in line]
    assert any("peer certificate rejected" in line for line in rejected), log
    assert any("unknown_ca" in line for line in rejected), log
    assert guest.r("nfs_untrusted_ca", "agent_reload") != "no"
    assert guest.r("nvme_done_status", "agent_exit") == "0"


def test_no_agent_fails_at_once(guest: Guest) -> None:
    assert float(guest.r("nvme_no_agent", "connect_seconds")) < 5
    assert guest.r("nvme_no_agent", "dmesg_target") == "nvmet_tcp: failed to start TLS, err=-3"
    assert guest.r("nvme_no_agent", "dmesg_host") == "queue 0: failed to start TLS: -3"


def test_raw_accept_reply_and_done_status(guest: Guest) -> None:
    """A real-kernel-only probe (scripts/qemu/accept-probe.py, no tlshd): the ACCEPT reply's
    attributes in wire order, and DONE(STATUS=13) failing the host's connect with EACCES."""
    replies = [p.strip(",").split(",") for p in
               guest.r("nvme_done_status", "accept_attrs").split(";") if p.strip(",")]
    assert replies
    for attrs in replies:
        assert attrs == ["SOCKFD", "MESSAGE_TYPE", "TIMEOUT", "AUTH_MODE", "PEER_IDENTITY"]
    assert guest.r("nvme_done_status", "done_ack") == "0"
    assert guest.r("nvme_done_status", "consumer_errno") == "EACCES"
    statuses = guest.evidence("nvme_done_status").statuses
    assert statuses and set(statuses) == {-13}


def test_done_needs_no_cap_net_admin_on_6_12(guest: Guest) -> None:
    """Settled on 6.12.95: DONE is not GENL_ADMIN_PERM (ACCEPT is). The probe ACCEPTs, drops
    CAP_NET_ADMIN from its effective set, and its DONE(13) is still acked and delivered."""
    if not guest.r("global", "kernel").startswith("6.12."):
        pytest.skip("a fact of the 6.12 tree")
    assert guest.r("nvme_done_noadmin", "cap_net_admin_at_done") == "0"
    assert guest.r("nvme_done_noadmin", "done_ack") == "0"
    assert guest.r("nvme_done_noadmin", "done_ack_without_admin") == ""  # never refused
    assert guest.r("nvme_done_noadmin", "consumer_errno") == "EACCES"
