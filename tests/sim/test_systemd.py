"""The systemd units and the agent's side of the service protocol.

* ``systemd-analyze verify`` accepts both units (ExecStart= rewritten to this checkout's
  ``tlshd`` script, the man pages of Documentation= on MANPATH), and the template's
  instance ``tlshd@test.service``. verify exits 0 even on unknown keys (it only warns),
  so the test fails on any line that names our units.
* ``systemd-analyze security``: the exposure score, printed, stays at or below 2.0, and
  the settings it counts against us are exactly the ones justified in ACCEPTED_EXPOSURE.
* The sandbox is checked against the real agent where that can be done without a
  running systemd: W^X memory (the kernel's PR_SET_MDWE, the same rule as
  MemoryDenyWriteExecute=) and the system call filter (every call of a traced agent
  serving x509 and PSK handshakes, reloading and stopping is in the unit's allow list).
* Type=notify: READY=1 only once every worker can be given requests, RELOADING=1 then
  READY=1 around SIGHUP (also when the new configuration is refused), STOPPING=1 on
  SIGTERM, nothing but an exit status when the start fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel_sim.consumer import TLSConsumer
from kernel_sim.kernel import Kernel
from kernel_sim.netns import socket_in_netns
from kernel_sim.nvme import NVMeKeyring, psk_identity
from tests.pki import PKI
from tests.sim.harness import Agent, pair, tcp_pair, write_config
from tlshd.install import render_unit

pytestmark = pytest.mark.sim

ROOT = Path(__file__).resolve().parents[2]
UNITS = {"tlshd.service": "tlshd.service", "tlshd@.service": "tlshd@test.service"}
MAX_EXPOSURE = 2.0
# What `systemd-analyze security` counts against the units, and why each must stay.
ACCEPTED_EXPOSURE = {
    "User=/DynamicUser=": "root for the supervisor and monitors: the kernel's keyrings (.nvme, "
                          ".nfs, .nfsd) and their keys grant nothing to other users; private "
                          "keys are root's. Handshakes run as [agent] worker_user",
    "CapabilityBoundingSet=~CAP_SET(UID|GID|PCAP)": "CAP_SETUID, CAP_SETGID: the step of each "
                                                    "handshake process into worker_user",
    "SystemCallFilter=~@privileged": "setresuid (in @privileged, as every uid change is): the "
                                     "same step",
    "PrivateNetwork=": "the agent serves the kernel of its network namespace",
    "PrivateUsers=": "ACCEPT needs CAP_NET_ADMIN in the initial user namespace",
    "CapabilityBoundingSet=~CAP_NET_ADMIN": "ACCEPT and DONE are GENL_ADMIN_PERM operations",
    "RestrictAddressFamilies=~AF_NETLINK": "the handshake generic netlink family",
    "RestrictAddressFamilies=~AF_UNIX": "syslog, sd_notify, the control socket",
    "IPAddressDeny=": "the Prometheus endpoint's scrapers are the administrator's to allow",
    "MemoryDenyWriteExecute=": "cffi ffi.callback closures (PSK callbacks) are W+X memory",
    "ProcSubset=": "libkeyutils finds keyrings by name in /proc/keys",
    "DeviceAllow=": "char-rtc:r, implied by ProtectClock=yes (PrivateDevices= has no RTC)",
}

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (Debian package systemd)")


# -- units as installed ------------------------------------------------------------------------


def tlshd_script() -> Path:
    """The console script of this checkout's install (the units' ExecStart=)."""
    beside = Path(sys.executable).parent / "tlshd"
    found = beside if beside.exists() else Path(shutil.which("tlshd") or "")
    if not found.is_file():
        pytest.skip("no installed tlshd script (pip install -e . first)")
    return found


@pytest.fixture(scope="module")
def unit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both units with ExecStart= pointing at the installed script, and a MANPATH
    holding the generated pages that Documentation= names."""
    directory = tmp_path_factory.mktemp("units")
    for name in UNITS:  # what `tlshd install` writes
        (directory / name).write_text(render_unit(name, str(tlshd_script())))
    for page, section in (("tlshd.8", "man8"), ("tlshd.conf.5", "man5")):
        (directory / "man" / section).mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / "tlshd" / "man" / page, directory / "man" / section / page)
    return directory


def analyze(unit_dir: Path, *args: str, quiet: bool = False) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MANPATH": str(unit_dir / "man"), "SYSTEMD_PAGER": "",
           "SYSTEMD_COLORS": "0"}
    result = subprocess.run(["systemd-analyze", *args], cwd=unit_dir, env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    shown = result.stderr if quiet else result.stdout + result.stderr
    print("$ systemd-analyze", *args, f"-> {result.returncode}\n{shown}")
    return result


def _about_our_units(output: str, unit_dir: Path) -> list[str]:
    return [line for line in output.splitlines() if str(unit_dir) in line or "tlshd" in line]


@needs_analyze
@pytest.mark.parametrize("unit", sorted(UNITS.values()))
def test_systemd_analyze_verify_accepts_the_unit(unit_dir: Path, unit: str) -> None:
    result = analyze(unit_dir, "verify", f"./{unit}")
    assert result.returncode == 0
    assert _about_our_units(result.stdout + result.stderr, unit_dir) == []


@needs_analyze
def test_verify_reports_a_mistake(unit_dir: Path, tmp_path: Path) -> None:
    """The check above can fail: a misspelt setting is reported against the file."""
    broken = tmp_path / "tlshd.service"
    broken.write_text((unit_dir / "tlshd.service").read_text()
                      .replace("NoNewPrivileges=yes", "NoNewPrivilege=yes"))
    shutil.copytree(unit_dir / "man", tmp_path / "man")
    result = analyze(tmp_path, "verify", "./tlshd.service")
    assert any("NoNewPrivilege" in line for line in _about_our_units(result.stderr, tmp_path))


@needs_analyze
@pytest.mark.parametrize("unit", sorted(UNITS.values()))
def test_security_exposure_is_low_and_every_exposure_is_justified(unit_dir: Path,
                                                                  unit: str) -> None:
    summary = analyze(unit_dir, "security", "--offline=yes", f"./{unit}")
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", summary.stdout)
    assert match is not None
    print(f"{unit}: exposure {match.group(1)} (at most {MAX_EXPOSURE})")
    assert float(match.group(1)) <= MAX_EXPOSURE
    checks = json.loads(analyze(unit_dir, "security", "--offline=yes", "--json=short",
                                f"./{unit}", quiet=True).stdout)
    counted = {c["name"] for c in checks if not c["set"] and c["exposure"] is not None}
    assert counted == set(ACCEPTED_EXPOSURE)


def _settings(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) of every setting, comments and blank lines dropped."""
    section, out = "", []
    for line in text.splitlines():
        if not line.strip() or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key, value))
    return out


def test_template_runs_the_same_service_in_a_named_namespace() -> None:
    main = _settings((ROOT / "tlshd/units/tlshd.service").read_text())
    template = _settings((ROOT / "tlshd/units/tlshd@.service").read_text())
    extra = [s for s in template if s not in main]
    assert extra == [
        ("Unit", "Description",
         "TLS handshake agent for kernel TLS consumers in network namespace %i"),
        ("Service", "NetworkNamespacePath", "/run/netns/%i"),
    ]
    assert [s for s in main if s not in template] == [
        ("Unit", "Description", "TLS handshake agent for kernel TLS consumers")]


# -- the sandbox against the real agent -------------------------------------------------------

PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1
_UNDER_MDWE = f"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:
    print(os.strerror(ctypes.get_errno()))
    sys.exit(77)
import tlshd.config
print("plain modules import")
import tlshd.handshake._psk
"""


def test_memory_deny_write_execute_would_break_the_psk_callbacks() -> None:
    """Why the units say MemoryDenyWriteExecute=no. If this starts failing, cffi no longer
    needs W+X memory for ffi.callback(): turn MemoryDenyWriteExecute=yes on."""
    result = subprocess.run([sys.executable, "-c", _UNDER_MDWE], capture_output=True,
                            text=True, timeout=60, cwd=ROOT, check=False)
    if result.returncode == 77:
        pytest.skip(f"prctl(PR_SET_MDWE): {result.stdout.strip()} (Linux < 6.3)")
    assert "plain modules import" in result.stdout
    assert result.returncode != 0 and "write+execute memory" in result.stderr
    for unit in UNITS:
        assert "\nMemoryDenyWriteExecute=no\n" in (ROOT / "tlshd" / "units" / unit).read_text()


def _syscall_groups() -> dict[str, list[str]]:
    """systemd-analyze syscall-filter: every @group and its members (calls and @groups)."""
    out = subprocess.run(["systemd-analyze", "syscall-filter"], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] = []
    for line in out.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.strip() and not line.strip().startswith("#"):
            current.append(line.strip())
    return groups


def _expand(names: list[str], groups: dict[str, list[str]]) -> set[str]:
    calls: set[str] = set()
    for name in names:
        calls |= _expand(groups[name], groups) if name.startswith("@") else {name}
    return calls


def allowed_syscalls(unit: str) -> set[str]:
    """The unit's SystemCallFilter= (an allow list first), applied in order as systemd.exec(5)
    says: a ~ entry removes its calls, a later plain entry adds its calls back."""
    groups, allowed = _syscall_groups(), set()
    for section, key, value in _settings(unit):
        if section == "Service" and key == "SystemCallFilter":
            calls = _expand(value.removeprefix("~").split(), groups)
            allowed = allowed - calls if value.startswith("~") else allowed | calls
    return allowed


def _psk_pair(kernel: Kernel) -> tuple[int, int]:
    ring = NVMeKeyring.create(name="kernel-sim:systemd-test")
    try:
        identity = psk_identity("nqn.2014-08.org.nvmexpress:uuid:host-1",
                                "nqn.2026-11.test.tlshd:subsys-1", 1)
        serial = ring.add_psk(identity, os.urandom(32))
        with tcp_pair() as (client, server):
            box: dict[str, int] = {}
            thread = threading.Thread(target=lambda: box.update(
                server=TLSConsumer(kernel).psk_server(server, keyring=ring.serial).status))
            thread.start()
            status = TLSConsumer(kernel).psk_client(client, (serial,)).status
            thread.join(20)
            kernel.sock_release(client)
            kernel.sock_release(server)
        return status, box.get("server", -1)
    finally:
        ring.close()


def _traced_pid(strace_pid: int) -> int:
    children = Path(f"/proc/{strace_pid}/task/{strace_pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


@needs_analyze
@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_every_system_call_of_the_agent_is_in_the_units_filter(kernel: Kernel, pki: PKI,
                                                                tmp_path: Path) -> None:
    """Start-up, x509 and PSK handshakes in both roles, a reload and a stop, traced: a call
    outside SystemCallFilter= would fail with EPERM under systemd. (kernel-sim stands in for
    the netlink family; the netlink calls, socket/bind/sendmsg/recvmsg/setsockopt, are in
    @network-io as well.)"""
    config = write_config(tmp_path, pki, kernel.endpoint, workers=2, require_client_cert=True)
    trace, log = tmp_path / "strace.log", tmp_path / "agent.log"
    with NotifySocket(tmp_path / "notify") as notify, log.open("w") as stderr:
        proc = subprocess.Popen(
            ["strace", "-f", "-qq", "-o", str(trace), sys.executable, "-m", "tlshd", "-s",
             "-c", str(config)], env={**os.environ, "NOTIFY_SOCKET": notify.address},
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            assert notify.wait_for("READY=1", 60), log.read_text()
            assert pair(kernel)  # mutual: the config requires client certificates == (0, 0)
            assert _psk_pair(kernel) == (0, 0)
            agent = _traced_pid(proc.pid)  # signals go to the agent, not to strace
            os.kill(agent, signal.SIGHUP)
            assert notify.wait_for("READY=1", 60)
            os.kill(agent, signal.SIGTERM)
            assert proc.wait(60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    called = set(re.findall(r"^\d+\s+([a-z_0-9]+)\(", trace.read_text(), re.M))
    allowed = allowed_syscalls((ROOT / "tlshd/units/tlshd.service").read_text())
    print(f"{len(called)} distinct system calls: {sorted(called)}")
    assert called - allowed == set()
    assert {"keyctl", "add_key"} <= called  # the trace did cover the keyring paths


# -- Type=notify -------------------------------------------------------------------------------


class NotifySocket:
    """A datagram socket standing in for systemd's notify socket."""

    def __init__(self, path: Path) -> None:
        self.address = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.address)
        self.messages: list[list[str]] = []

    def __enter__(self) -> NotifySocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def next(self, timeout: float) -> list[str] | None:
        """The next notification's fields, or None after ``timeout`` seconds."""
        self.sock.settimeout(timeout)
        try:
            fields = self.sock.recv(4096).decode().split("\n")
        except TimeoutError:
            return None
        self.messages.append(fields)
        return fields

    def wait_for(self, field: str, timeout: float) -> list[str] | None:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            fields = self.next(left)
            if fields is not None and field in fields:
                return fields
        return None


@pytest.fixture
def notify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    with NotifySocket(tmp_path / "notify") as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", sock.address)  # the agent inherits it
        yield sock


def test_ready_reload_and_stopping_are_notified_when_they_are_true(
        kernel: Kernel, pki: PKI, tmp_path: Path, notify: NotifySocket) -> None:
    workers = 3
    ns = kernel.netns_of(socket_in_netns(None))
    config = write_config(tmp_path, pki, kernel.endpoint, workers=workers)
    agent = Agent(config)
    try:
        first = notify.next(60)
        joined_at_ready = kernel.listeners(ns)
        assert first is not None and "READY=1" in first, (first, agent.log)
        assert joined_at_ready >= workers  # a request queued now is served
        assert pair(kernel)  # mutual: the config requires client certificates == (0, 0)

        agent.proc.send_signal(signal.SIGHUP)
        reloading = notify.next(30)
        assert reloading is not None and reloading[0] == "RELOADING=1"
        assert any(re.fullmatch(r"MONOTONIC_USEC=\d+", f) for f in reloading)
        ready = notify.next(60)
        assert ready is not None and "READY=1" in ready
        assert kernel.listeners(ns) >= workers

        agent.proc.send_signal(signal.SIGTERM)
        stopping = notify.wait_for("STOPPING=1", 30)
        assert stopping is not None
        assert agent.stop() == 0
    finally:
        agent.stop()
    assert [m for m in notify.messages if "READY=1" in m] == [first, ready]


def test_a_refused_reload_still_ends_with_ready(kernel: Kernel, pki: PKI, tmp_path: Path,
                                               notify: NotifySocket) -> None:
    """systemd waits for READY=1 after RELOADING=1 either way; the old configuration serves."""
    config = write_config(tmp_path, pki, kernel.endpoint, workers=1)
    agent = Agent(config)
    try:
        assert notify.wait_for("READY=1", 60)
        config.write_text(config.read_text() + "\n[agent]\nworkers=many\n")
        agent.proc.send_signal(signal.SIGHUP)
        assert (reloading := notify.next(30)) is not None and reloading[0] == "RELOADING=1"
        ready = notify.next(30)
        assert ready is not None and "READY=1" in ready
        assert any(f.startswith("STATUS=") and "reload failed" in f for f in ready)
        assert pair(kernel)  # mutual: the config requires client certificates == (0, 0)
    finally:
        assert agent.stop() == 0


def test_a_failed_start_sends_no_ready(kernel: Kernel, pki: PKI, tmp_path: Path,
                                       notify: NotifySocket) -> None:
    """With Type=notify, systemd sees the start fail from the exit status alone."""
    config = write_config(tmp_path, pki, kernel.endpoint)
    config.write_text(config.read_text() + "[agent]\nworkers=lots\n")  # a value it refuses
    agent = Agent(config)
    assert agent.proc.wait(60) == 1
    assert notify.next(0.5) is None
