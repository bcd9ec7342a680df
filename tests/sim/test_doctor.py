"""tlshd doctor on this host: the real kernel's netlink and ULP, real keyrings and capabilities,
and kernel-sim as the upcall.

The verdicts about the kernel depend on the host: these development machines have no
``handshake`` family and no ``tls`` module, and the tests that say so are skipped on a host
that has them.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel_sim.kernel import Kernel
from tests.pki import PKI
from tlshd import doctor, keyring
from tlshd.doctor import Level, Verdict
from tlshd.errors import TlshdError
from tlshd.upcall import NetlinkUpcall

pytestmark = pytest.mark.sim
SUBPROCESS_TIMEOUT_S = 60
REPO = Path(__file__).resolve().parents[2]


def _host_has_handshake_family() -> bool:
    try:
        NetlinkUpcall().close()
    except (TlshdError, OSError):
        return False
    return True


def _host_has_tls_ulp() -> bool:
    return doctor.check_tls_ulp(simulated=False)[0].level is Level.OK


needs_no_family = pytest.mark.skipif(_host_has_handshake_family(),
                                     reason="this kernel has the handshake family")
needs_no_tls_ulp = pytest.mark.skipif(_host_has_tls_ulp(), reason="this kernel has the tls ULP")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def write_config(directory: Path, pki: PKI, *, upcall: str = "", keyrings: str = "") -> Path:
    text = (
        (f"[authenticate]\nkeyrings={keyrings}\n\n" if keyrings else "")
        + f"[authenticate.client]\nx509.truststore={pki.ca}\n"
        f"x509.certificate={pki.client.cert}\nx509.private_key={pki.client.key}\n\n"
        f"[authenticate.server]\nx509.truststore={pki.ca}\n"
        f"x509.certificate={pki.server.cert}\nx509.private_key={pki.server.key}\n"
        + (f"\n[agent]\nupcall={upcall}\n" if upcall else "")
    )
    path = directory / "tlshd.conf"
    path.write_text(text)
    return path


def only(verdicts: list[Verdict], check: str) -> Verdict:
    (found,) = [v for v in verdicts if v.check == check]
    return found


def keyctl(*args: str) -> str:
    done = subprocess.run(["keyctl", *args], capture_output=True, text=True, check=True,
                          timeout=SUBPROCESS_TIMEOUT_S)
    return done.stdout.strip()


@pytest.fixture
def ring() -> Iterator[tuple[str, int]]:
    """A keyring of a unique name in this process's session keyring."""
    name = f"tlshd-doctor-{uuid.uuid4().hex[:8]}"
    session = keyring.keyring_id(keyring.KEY_SPEC_SESSION_KEYRING, create=True)
    serial = int(keyctl("newring", name, str(session)))
    yield name, serial
    keyctl("unlink", str(serial), str(session))


# --- the upcall ------------------------------------------------------------------------------


@needs_no_family
def test_netlink_mode_fails_for_the_missing_handshake_family(pki: PKI, tmp_path: Path) -> None:
    verdicts = doctor.collect(write_config(tmp_path, pki), "netlink")

    verdict = only(verdicts, "upcall")
    assert verdict.level is Level.FAIL
    assert "no 'handshake' generic netlink family" in verdict.detail
    assert verdict.fix == "kernel needs CONFIG_NET_HANDSHAKE (Linux 6.4+)"


def test_kernel_sim_endpoint_from_the_config_answers(kernel: Kernel, pki: PKI,
                                                     tmp_path: Path) -> None:
    config = write_config(tmp_path, pki, upcall=f"kernel-sim:{kernel.endpoint}")

    verdict = only(doctor.collect(config, None), "upcall")

    assert verdict.level is Level.OK
    assert f"kernel-sim endpoint {kernel.endpoint!r} answers" in verdict.detail
    assert "simulator" in verdict.detail


def test_upcall_argument_overrides_the_config(kernel: Kernel, pki: PKI, tmp_path: Path) -> None:
    config = write_config(tmp_path, pki, upcall="kernel-sim:nobody-listens-here")

    verdicts = doctor.collect(config, f"kernel-sim:{kernel.endpoint}")

    assert only(verdicts, "upcall").level is Level.OK


def test_kernel_sim_endpoint_nobody_serves_fails(pki: PKI, tmp_path: Path) -> None:
    endpoint = f"tlshd-doctor-{uuid.uuid4().hex[:8]}"

    verdict = only(doctor.collect(write_config(tmp_path, pki), f"kernel-sim:{endpoint}"),
                   "upcall")

    assert verdict.level is Level.FAIL
    assert "Connection refused" in verdict.detail
    assert verdict.fix is not None and endpoint in verdict.fix


# --- the tls ULP -------------------------------------------------------------------------------


@needs_no_tls_ulp
def test_tls_ulp_fails_in_netlink_mode(pki: PKI, tmp_path: Path) -> None:
    verdict = only(doctor.collect(write_config(tmp_path, pki), "netlink"), "tls ULP")

    assert verdict.level is Level.FAIL
    assert verdict.detail == ('setsockopt(TCP_ULP, "tls") -> ENOENT: '
                              "the tls module is not loaded")
    assert verdict.fix == "modprobe tls (CONFIG_TLS=m)"


@needs_no_tls_ulp
def test_tls_ulp_only_warns_under_kernel_sim(kernel: Kernel, pki: PKI, tmp_path: Path) -> None:
    verdicts = doctor.collect(write_config(tmp_path, pki), f"kernel-sim:{kernel.endpoint}")

    assert only(verdicts, "tls ULP").level is Level.WARN


# --- keyrings -----------------------------------------------------------------------------------


def test_configured_keyring_that_is_missing_fails(pki: PKI, tmp_path: Path) -> None:
    name = f"tlshd-doctor-absent-{uuid.uuid4().hex[:8]}"

    verdict = only(doctor.collect(write_config(tmp_path, pki, keyrings=name), "netlink"),
                   f"keyring {name}")

    assert verdict.level is Level.FAIL
    assert "not found" in verdict.detail


def test_configured_keyring_that_exists_is_ok(ring: tuple[str, int], pki: PKI,
                                              tmp_path: Path) -> None:
    name, serial = ring

    verdict = only(doctor.collect(write_config(tmp_path, pki, keyrings=name), "netlink"),
                   f"keyring {name}")

    assert verdict == Verdict(Level.OK, f"keyring {name}", f"serial {serial}, searchable")


def test_configured_keyring_we_cannot_search_fails(ring: tuple[str, int], pki: PKI,
                                                   tmp_path: Path) -> None:
    name, serial = ring
    keyctl("setperm", str(serial), "0x37370000")  # possessor and user: all but search

    verdict = only(doctor.collect(write_config(tmp_path, pki, keyrings=name), "netlink"),
                   f"keyring {name}")

    assert verdict.level is Level.FAIL
    assert "EACCES" in verdict.detail


def test_kernel_keyrings_are_reported_present_or_absent(pki: PKI, tmp_path: Path) -> None:
    verdicts = doctor.collect(write_config(tmp_path, pki), "netlink")

    for name in (".nvme", ".nfs", ".nfsd"):
        assert only(verdicts, f"keyring {name}").level in (Level.OK, Level.WARN)


# --- privileges ---------------------------------------------------------------------------------


@needs_root
def test_cap_net_admin_is_ok_as_root(pki: PKI, tmp_path: Path) -> None:
    verdict = only(doctor.collect(write_config(tmp_path, pki), "netlink"), "CAP_NET_ADMIN")

    assert verdict == Verdict(Level.OK, "CAP_NET_ADMIN",
                              "in the effective set, initial user namespace")


@needs_root
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_cap_net_admin_fails_without_it(kernel: Kernel, pki: PKI, tmp_path: Path) -> None:
    config = write_config(tmp_path, pki)
    script = ("import sys; from pathlib import Path; from tlshd.doctor import run_doctor; "
              f"sys.exit(run_doctor(Path({str(config)!r}), 'kernel-sim:{kernel.endpoint}', "
              "sys.stdout))")

    done = subprocess.run(
        ["setpriv", "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-net_admin",
         "--", sys.executable, "-c", script],
        capture_output=True, text=True, cwd=REPO, timeout=SUBPROCESS_TIMEOUT_S, check=False)

    assert done.returncode == 1, done.stdout + done.stderr
    assert ("FAIL  CAP_NET_ADMIN: not in the effective set: the kernel refuses ACCEPT (EPERM)"
            in done.stdout.splitlines())
    assert "OK    upcall: kernel-sim endpoint" in done.stdout


# --- the whole report ---------------------------------------------------------------------------


def test_healthy_set_up_under_kernel_sim_exits_zero(kernel: Kernel, pki: PKI,
                                                    tmp_path: Path) -> None:
    out = io.StringIO()

    status = doctor.run_doctor(write_config(tmp_path, pki), f"kernel-sim:{kernel.endpoint}", out)

    lines = out.getvalue().splitlines()
    assert status == 0, out.getvalue()
    assert not [line for line in lines if line.startswith("FAIL")]
    assert lines[-1].startswith("0 failures") and lines[-1].endswith(": healthy")


@needs_no_family
def test_report_on_this_kernel_exits_one(pki: PKI, tmp_path: Path) -> None:
    out = io.StringIO()

    status = doctor.run_doctor(write_config(tmp_path, pki), "netlink", out)

    assert status == 1
    assert "      fix: kernel needs CONFIG_NET_HANDSHAKE (Linux 6.4+)" in out.getvalue()


def test_tlshd_doctor_command(kernel: Kernel, pki: PKI, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tlshd", "doctor", "-c", str(write_config(tmp_path, pki)),
         "--upcall", f"kernel-sim:{kernel.endpoint}"],
        capture_output=True, text=True, cwd=REPO, timeout=SUBPROCESS_TIMEOUT_S, check=False)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK    upcall: kernel-sim endpoint" in done.stdout
    assert done.stdout.rstrip().endswith(": healthy")
