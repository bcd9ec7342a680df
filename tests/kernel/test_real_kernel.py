"""The scenario suite on Linux's own NVMe/TCP and NFS consumers, under QEMU, on two kernels:
Debian trixie's 6.12 and trixie-backports' 7.3.

Marker ``qemu``: deselected by the default addopts, run by ``scripts/test`` (and so by CI) with
``pytest -m qemu tests/kernel``. Needs root, x86-64 and, on the first run, the package
registries: scripts/qemu/run-guest.sh downloads both kernels, builds a trixie root
(make-rootfs.sh) and boots each once under QEMU/TCG; scripts/qemu/guest.sh plays every scenario
with this checkout's agent, on the guest's own python3-openssl and python3-cryptography.
The guest writes ``RESULT scenario.key=value`` lines, tracefs and
/proc/net/tls_stat snapshots; these tests read them and compare with tests/kernel/scenarios.py,
exactly as test_sim_scenarios.py does for kernel-sim.
"""

from __future__ import annotations

import errno
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.kernel.evidence import (
    Evidence,
    parse_tls_stat,
    parse_tracefs,
    read_results,
    scenario_evidence,
)
from tests.kernel.scenarios import NVME_QUEUES, SCENARIOS

pytestmark = pytest.mark.qemu

REPO = Path(__file__).resolve().parents[2]
RUN_GUEST = REPO / "scripts" / "qemu" / "run-guest.sh"
# the no-agent and raw-agent scenarios stop the agent: they go last
ORDER = ["nvme_psk", "nvme_psk_sha384", "nfs_tls", "nfs_mtls", "nfs_plain_refused",
         "nfs_tls_on_mtls", "nfs_untrusted_ca", "app_pair", "app_wrap", "nvme_startup",
         "nvme_done_status", "nvme_done_noadmin", "nvme_no_agent"]
# Issue 12 item 9: a mount loop once stalled 5 s (1 of 17 mounts, 6.12.117). A cycle past 3 s
# is reported by guest.sh as slow; these run after nfs_untrusted_ca, with the agent serving.
MOUNT_LOOP = 20
_LOOP_AT = ORDER.index("nvme_startup")
GUEST_ARGS = [*ORDER[:_LOOP_AT], "nfs_loop", str(MOUNT_LOOP), *ORDER[_LOOP_AT:]]
KERNELS = ["6.12", "7.3"]  # TLSHD_QEMU_KERNEL of run-guest.sh
# Exec to listener in the 2-vCPU TCG guest. Issue 12 sets two figures: the kernel sees a
# listener within 300 ms of exec (the target, reported as met or not: the interpreter's own
# start-up, `python3 -I -S -c pass`, takes 210-410 ms in this guest over its 9p root), and the
# agent is ready within 1 s of start (what it must show: asserted).
READY_TARGET_MS = 300
READY_LIMIT_MS = 1000
# early.py imports only interpreter built-ins before it joins: its cost over the bare
# interpreter stays small (importing `socket` first cost 270 ms more here)
OVER_INTERPRETER_MS = 200


@dataclass
class Guest:
    out: Path
    results: dict[str, str]  # "scenario.key": value
    series: str = "6.12"

    def r(self, scenario: str, key: str) -> str:
        return self.results.get(f"{scenario}.{key}", "<missing>")

    def evidence(self, scenario: str) -> Evidence:
        return scenario_evidence(self.out, scenario)

    def agent_log(self, *, skip: tuple[str, ...] = ()) -> str:
        return "".join(p.read_text() for p in sorted(self.out.glob("agent-*.log"))
                       if p.stem.removeprefix("agent-") not in skip)


@pytest.fixture(scope="module", params=KERNELS)
def guest(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Guest:
    if os.geteuid() != 0:
        pytest.skip("the QEMU tier needs root")
    if platform.machine() != "x86_64":
        pytest.skip("the QEMU tier boots Debian's amd64 kernel")
    series: str = request.param
    out = tmp_path_factory.mktemp(f"qemu-out-{series}")
    proc = subprocess.run(
        ["bash", str(RUN_GUEST), str(out), *GUEST_ARGS],
        env={**os.environ, "TLSHD_QEMU_KERNEL": series},
        stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=int(os.environ.get("TLSHD_QEMU_TIMEOUT", "600")) * 2 + 1800, check=False,
    )
    guest = Guest(out, read_results(out / "results"), series)
    assert guest.r("global", "done") == "yes", (
        f"guest script did not finish (rc={proc.returncode}); console: {out / 'console.log'}\n"
        + proc.stderr[-4000:]
    )
    report = Path(os.environ.get("TLSHD_QEMU_REPORT", REPO / "var" / "qemu-report.txt"))
    report.parent.mkdir(parents=True, exist_ok=True)
    with report.open("a") as file:
        file.write(timing_report(guest))
    return guest


def timing_report(guest: Guest) -> str:
    """Per-handshake times from the kernel's tracepoints, a line a scenario."""
    host = read_results(guest.out / "host-results")
    tries = [k for k in host if k.startswith("boot_try_")]
    lines = [f"Linux {guest.r('global', 'kernel')}, accelerator: {host.get('accel', '?')}, "
             f"boots: {len(tries)}"
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
    listener, accept = startup_ms(guest)
    verdict = "met" if listener <= READY_TARGET_MS else "NOT met"
    lines.append(f"start-up: exec to listener {listener:.0f} ms (target {READY_TARGET_MS} ms: "
                 f"{verdict}), exec to first ACCEPT "
                 f"{accept:.0f} ms (a connect issued as soon as the kernel saw the listener); "
                 f"python3 -c pass takes {guest.r('global', 'python_startup_s')} s here, "
                 f"python3 -I -S -c pass {guest.r('global', 'python_nosite_startup_s')} s "
                 f"at boot, {guest.r('nvme_startup', 'python_nosite_startup_all')} s "
                 "just before the agent")
    return "\n".join(lines) + "\n"


def startup_ms(guest: Guest) -> tuple[float, float]:
    """nvme_startup: exec to listener, and exec to the first ACCEPT (CLOCK_MONOTONIC)."""
    exec_s = float(guest.r("nvme_startup", "exec_mono") or "nan")
    listener = (float(guest.r("nvme_startup", "listener_mono") or "nan") - exec_s) * 1000
    trace = guest.out / "nvme_startup" / "trace.txt"
    accepts = [e.ts for e in parse_tracefs(trace.read_text()) if e.event == "cmd_accept"] \
        if trace.exists() else []
    accept = (min(accepts) - exec_s) * 1000 if accepts else float("nan")
    return listener, accept


def test_kernel_modules_and_family(guest: Guest) -> None:
    assert read_results(guest.out / "host-results")["accel"] in ("kvm", "tcg")
    assert guest.r("global", "kernel").startswith(f"{guest.series}.")
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
    log = guest.agent_log(skip=("nvme_startup",))  # its connect is checked on its own
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
    # nfs_tls, nfs_mtls, nfs_tls_on_mtls: a client and a server handshake each; nfs_loop: one
    # xprtsec=tls client handshake a cycle
    assert sum("role=client auth=UNAUTH peer=127.0.0.1" in line for line in ok) == 2 + MOUNT_LOOP
    assert sum("role=client auth=X509 peer=127.0.0.1" in line for line in ok) == 1
    rejected = [line for line in log.splitlines() if "status=13" in line]
    assert any("peer certificate rejected" in line for line in rejected), log
    assert any("unknown_ca" in line for line in rejected), log
    assert guest.r("nfs_untrusted_ca", "agent_reload") != "no"
    assert guest.r("nvme_done_status", "agent_exit") == "0"


def test_session_tags_are_logged_and_never_sent_to_a_kernel_that_does_not_declare_them(
        guest: Guest) -> None:
    """The guest's agent has a tags.d (scripts/qemu/guest.sh). Neither 6.12.117 nor 7.3.4
    declares DONE attribute 4, so the tags appear in the server lines only, and the DONEs
    that would have carried them were accepted: the mounts went through."""
    log = guest.agent_log(skip=("nvme_startup",))
    servers = [line for line in log.splitlines() if "role=server auth=X509" in line
               and " status=0 " in line]
    assert servers, log
    assert all(line.count(" tags=") == 1 for line in servers), servers
    assert any(" tags=test-clients " in line for line in servers), servers  # nfs_mtls
    assert any(" tags=no-certificate " in line for line in servers), servers  # nfs_tls
    assert not any(" tags=" in line for line in log.splitlines() if "role=client" in line)
    assert guest.r("nfs_mtls", "mount_proto") == "vers=4.2,xprtsec=mtls"


def test_an_application_gets_ktls_on_its_own_sockets(guest: Guest) -> None:
    """tlshd.app (issue 17): the agent secures both ends of a loopback pair through its
    application endpoint; the kernel then carries 4 MiB and 1 MiB byte-exact with plain
    send/recv on the sockets (the ULP is "tls"); uid 65534, not in allow_users, gets EACCES."""
    assert guest.r("app_pair", "client_status") == "0", (guest.out / "app_pair").as_posix()
    assert guest.r("app_pair", "server_status") == "0"
    assert guest.r("app_pair", "client_peer") == "CN=server.test,O=tlshd tests"
    assert guest.r("app_pair", "server_peer") == "CN=client.test,O=tlshd tests"
    assert guest.r("app_pair", "client_cipher").startswith("TLS_")
    assert guest.r("app_pair", "ulp") == "tls"
    assert guest.r("app_pair", "up_exact") == "yes"
    assert guest.r("app_pair", "down_exact") == "yes"
    assert guest.r("app_pair", "other_uid_errno") == str(errno.EACCES)
    # a Python ssl server's two NewSessionTickets: read by the agent, not EIO for recv()
    assert guest.r("app_pair", "ticket_server_read") == "revres ,olleh"


def test_a_peers_key_update_after_the_hand_over_is_as_documented(guest: Guest) -> None:
    """docs/applications.md: openssl s_server sends a KeyUpdate after the hand-over. The
    first plain read gets EIO (a record that is not data), and so does the next one. On
    Linux 6.12 the socket still polls readable; on 7.3 (6.14+ rekey support) it no longer
    does, although the peer's next record has arrived: a program that polls before it
    reads waits for ever."""
    assert guest.r("app_pair", "keyupdate_before") == "before"
    expected = "EIO,readable:EIO" if guest.series == "6.12" else "EIO,quiet:EIO"
    assert guest.r("app_pair", "keyupdate_reads") == expected


def test_unmodified_programs_under_tlshd_wrap_get_tls_from_the_agent(guest: Guest) -> None:
    """tlshd wrap (issue 17): curl speaks plain HTTP inside its connect()-secured socket to
    openssl s_server; python3 -m http.server, unmodified, serves curl https:// with the
    agent's certificate. Each 1 MiB file arrives byte-exact. A TLS 1.2 client fails its own
    handshake (curl 35) and never reaches the server, which serves the next one."""
    def r(key: str) -> str:
        return guest.r("app_wrap", key)

    file = r("file_sha256")
    assert len(file) == 64, (guest.out / "app_wrap").as_posix()
    # -WWW: no Content-Length, so curl reads to the end: the body is whole, and then
    # s_server's close_notify alert reaches curl's read() as EIO (docs/applications.md)
    assert r("curl_sha256") == file
    assert r("curl_rc") == "56"
    assert "Recv failure: Input/output error" in \
        (guest.out / "app_wrap" / "wrap-curl.txt").read_text()
    assert (r("curl_length_rc"), r("curl_length_sha256")) == ("0", file)  # -HTTP, a length
    assert (r("https_rc"), r("https_sha256")) == ("0", file)
    assert r("tls12_rc") == "35"
    assert r("after_rc") == "0"
    assert r("wrap_tls_lines") == "4"  # two curl connects, two http.server accepts


def test_no_agent_fails_at_once(guest: Guest) -> None:
    assert float(guest.r("nvme_no_agent", "connect_seconds")) < 5
    assert guest.r("nvme_no_agent", "dmesg_target") == "nvmet_tcp: failed to start TLS, err=-3"
    assert guest.r("nvme_no_agent", "dmesg_host") == "queue 0: failed to start TLS: -3"


def test_raw_accept_reply_and_done_status(guest: Guest) -> None:
    """A real-kernel-only probe (scripts/qemu/accept-probe.py, no tlshd): the ACCEPT reply's
    attributes in wire order, and DONE(STATUS=13) failing the host's connect with EACCES."""
    replies = [p.strip(",").split(",") for p in
               guest.r("nvme_done_status", "accept_attrs").split(";") if p.strip(",")]
    assert len(replies) == 2  # the host's request, the target's
    # KEYRING (9) arrived after 6.12 (6.17, inferred); kernel-sim's MAINLINE profile puts it
    # in the same place (kernel-sim/tests/test_kernel.py)
    keyring = [] if guest.series == "6.12" else ["KEYRING"]
    for attrs in replies:
        assert attrs == ["SOCKFD", "MESSAGE_TYPE", "TIMEOUT", *keyring, "AUTH_MODE",
                         "PEER_IDENTITY"]
    assert guest.r("nvme_done_status", "done_ack") == "0"
    assert guest.r("nvme_done_status", "consumer_errno") == "EACCES"
    statuses = guest.evidence("nvme_done_status").statuses
    assert statuses and set(statuses) == {-13}


def test_done_and_cap_net_admin(guest: Guest) -> None:
    """The probe ACCEPTs, drops CAP_NET_ADMIN from its effective set, and sends DONE(13).
    6.12.95 acked it; 6.12.117 and 7.3.4 refuse it with EPERM, like ACCEPT (kernel-sim's
    profiles: LINUX_6_12, LINUX_6_12_117, LINUX_7_3). The probe then answers with the
    capability back, so the connect fails with the status either way."""
    release = guest.r("global", "kernel")
    assert guest.r("nvme_done_noadmin", "cap_net_admin_at_done") == "0"
    assert guest.r("nvme_done_noadmin", "done_ack") == "0"
    refused = guest.r("nvme_done_noadmin", "done_ack_without_admin")
    assert refused == ("" if release.startswith("6.12.95") else "-1"), release
    assert guest.r("nvme_done_noadmin", "consumer_errno") == "EACCES"


def test_a_mount_loop_has_no_stall(guest: Guest) -> None:
    """Issue 12 item 9: every cycle of mount + umount (xprtsec=tls) succeeds within 3 s."""
    assert guest.r("nfs_loop", "cycles_ok") == str(MOUNT_LOOP)
    assert guest.r("nfs_loop", "slow_cycles") == "none", guest.agent_log()[-3000:]


def test_a_connect_while_the_agent_loads_waits_and_succeeds(guest: Guest) -> None:
    """Issue 12: a request that arrives while the agent is still loading waits in the kernel's
    queue instead of failing, and the kernel sees a listener within 1 s of exec. The 300 ms
    target is reported (var/qemu-report.txt), not asserted: see READY_TARGET_MS."""
    assert guest.r("nvme_startup", "consumer_errno") == "0"
    assert guest.r("nvme_startup", "ready_then") == "no"  # the connect came before READY=1
    evidence = guest.evidence("nvme_startup")
    assert evidence.submit_errors == () and set(evidence.statuses) == {0}
    listener, accept = startup_ms(guest)
    assert listener <= READY_LIMIT_MS, f"exec to listener {listener:.0f} ms"
    # measured in the scenario just before the agent starts: a floor measured at boot ran on
    # an idle guest, and the start-up after twenty mount cycles is slower for any program
    floor = float(guest.r("nvme_startup", "python_nosite_startup_s")) * 1000
    assert listener <= floor + OVER_INTERPRETER_MS, (listener, floor)
    assert accept > listener


@pytest.mark.parametrize("name", ["nvme_psk", "nfs_tls", "nfs_mtls"])
def test_handshakes_run_in_confined_processes(guest: Guest, name: str) -> None:
    """Issue 14: on the real kernel, while Linux's own consumers are served, every handshake
    process under the agent has CapEff 0, NoNewPrivs 1 and Seccomp 2 as nobody (65534), and
    every worker (monitor) keeps CAP_NET_ADMIN for ACCEPT and DONE."""
    assert guest.r(name, "consumer_errno") == "0"
    procs = [entry.split("/") for entry in guest.r(name, "agent_processes").split()]
    confined = [p for p in procs if p[0] != "0"]
    monitors = [p for p in procs if p[0] == "0"]
    assert confined and len(confined) == len(monitors), procs
    assert all(p == ["65534", "0000000000000000", "1", "2"] for p in confined), procs
    assert all(int(p[1], 16) & (1 << 12) for p in monitors), procs


def test_the_family_policy_is_read_and_kernel_sim_agrees(guest: Guest) -> None:
    """Issue 13: the agent reads the handshake family's policy (nlctrl GETPOLICY) on the real
    kernel; DONE declares STATUS, SOCKFD and REMOTE_AUTH only (no session tags), and
    kernel-sim's profile for that kernel declares the same."""
    import uuid

    from kernel_sim.kernel import Kernel
    from kernel_sim.profile import LINUX_6_12_117, LINUX_7_3
    from tlshd.upcall import SimUpcall

    real = guest.r("global", "handshake_policy")
    assert real == "ACCEPT(2) DONE(1,2,3) no-tags", real
    profile = LINUX_6_12_117 if guest.series == "6.12" else LINUX_7_3
    with Kernel(endpoint=f"tlshd-policy-{uuid.uuid4().hex[:8]}", profile=profile) as kernel:
        kernel.add_netns(None)
        up = SimUpcall(kernel.endpoint, join=False)
        try:
            assert up.policy is not None
            simulated = up.policy.describe({2: "ACCEPT", 3: "DONE"})
        finally:
            up.close()
    assert f"{simulated} no-tags" == real
