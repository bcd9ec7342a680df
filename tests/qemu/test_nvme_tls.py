"""Real-kernel tier: NVMe/TCP with TLS between Linux's own host and target, tlshd as the agent.

Opt-in: `pytest -m qemu tests/qemu` (the default addopts deselect the `qemu` marker). Needs root,
x86-64 and, on the first run, the package registries: scripts/qemu/run-guest.sh downloads
Debian's 6.12 kernel and virtme-ng into var/qemu, boots the kernel under QEMU/TCG over this
host's root and runs scripts/qemu/guest-nvme.sh inside it (about 1.5 minutes per boot).
The guest writes `RESULT key=value` lines; these tests read them.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.qemu

REPO = Path(__file__).resolve().parents[2]
RUN_GUEST = REPO / "scripts" / "qemu" / "run-guest.sh"


def _counters(value: str) -> dict[str, int]:
    return {k: int(v) for k, v in (item.split(":") for item in value.split(",") if item)}


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], Path]:
    if os.geteuid() != 0:
        pytest.skip("the QEMU tier needs root")
    if platform.machine() != "x86_64":
        pytest.skip("the QEMU tier boots Debian's amd64 kernel")
    out = tmp_path_factory.mktemp("qemu-out")
    proc = subprocess.run(
        ["bash", str(RUN_GUEST), str(out)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=int(os.environ.get("TLSHD_QEMU_TIMEOUT", "300")) * 2 + 900,
        check=False,
    )
    results: dict[str, str] = {}
    results_file = out / "results"
    if results_file.exists():
        for line in results_file.read_text().splitlines():
            m = re.match(r"RESULT ([^=]+)=(.*)$", line)
            if m:
                results[m.group(1)] = m.group(2)
    assert results.get("done") == "yes", (
        f"guest script did not finish (rc={proc.returncode}); console: {out / 'console.log'}\n"
        + proc.stderr[-4000:]
    )
    return results, out


def test_modules_and_family(guest: tuple[dict[str, str], Path]) -> None:
    r, _ = guest
    for m in ("tls", "nvme-keyring", "nvme-tcp", "nvmet", "nvmet-tcp"):
        assert r[f"modprobe_{m}"] == "0", m
    assert r["genl_handshake"] == "ok"
    assert r["nvmet_tsas"] == "tls1.3"


def test_agent_ready(guest: tuple[dict[str, str], Path]) -> None:
    r, out = guest
    assert r["agent_ready"] != "no", (out / "agent.log").read_text()


def test_connect_and_io(guest: tuple[dict[str, str], Path]) -> None:
    r, out = guest
    assert r["connect_rc"] == "0", r.get("connect_error", "") + (out / "agent.log").read_text()
    assert r["ctrl_state"] == "live"
    assert r["dd_write_rc"] == "0"
    assert r["dd_read_rc"] == "0"
    assert r["data_identical"] == "yes"
    assert r["disconnect_rc"] == "0"


def test_handshake_tracepoints(guest: tuple[dict[str, str], Path]) -> None:
    r, _ = guest
    queues = int(r["ctrl_queue_count"])  # admin queue + I/O queues
    expected = 2 * queues  # a client (host) and a server (target) handshake per queue
    assert int(r["trace_submit"]) == expected
    assert int(r["trace_accept"]) == expected
    assert int(r["trace_done"]) == expected
    assert int(r["trace_complete"]) == expected
    assert r["trace_submit_err"] == "0"
    assert _counters(r["trace_complete_statuses"]) == {"0": expected}


def test_ktls_counters(guest: tuple[dict[str, str], Path]) -> None:
    r, _ = guest
    expected = 2 * int(r["ctrl_queue_count"])
    before = _counters(r["tls_stat_before"])
    connected = _counters(r["tls_stat_connected"])
    after = _counters(r["tls_stat_after"])
    assert connected["TlsCurrTxSw"] - before["TlsCurrTxSw"] == expected
    assert connected["TlsCurrRxSw"] - before["TlsCurrRxSw"] == expected
    assert after["TlsTxSw"] - before["TlsTxSw"] == expected
    assert after["TlsRxSw"] - before["TlsRxSw"] == expected
    assert after["TlsCurrTxSw"] == before["TlsCurrTxSw"]  # all closed after disconnect
    assert after["TlsDecryptError"] == before["TlsDecryptError"]


def test_agent_log(guest: tuple[dict[str, str], Path]) -> None:
    r, out = guest
    log = (out / "agent.log").read_text()
    expected = 2 * int(r["ctrl_queue_count"])
    ok = [line for line in log.splitlines() if " status=0 " in line and " ok " in line]
    assert len(ok) == expected, log
    assert sum("role=client auth=PSK" in line for line in ok) == expected // 2
    assert sum("role=server auth=PSK" in line for line in ok) == expected // 2
    assert "Traceback" not in log
    assert r["agent_exit"] == "0"


def test_no_agent_fails_at_once(guest: tuple[dict[str, str], Path]) -> None:
    r, _ = guest
    assert r["noagent_connect_rc"] != "0"
    assert "No such process" in r["noagent_connect_error"]
    assert r["noagent_dmesg"] == "nvmet_tcp: failed to start TLS, err=-3"  # the target
    assert r["noagent_dmesg_host"] == "queue 0: failed to start TLS: -3"  # the host
    assert float(r["noagent_connect_seconds"]) < 5


def test_raw_accept_reply(guest: tuple[dict[str, str], Path]) -> None:
    """What a 6.12 kernel puts in the ACCEPT reply, seen by scripts/qemu/accept-probe.py."""
    r, _ = guest
    replies = [part.strip(",").split(",") for part in r["probe_accept_attrs"].split(";") if part]
    assert replies, r["probe_accept_attrs"]
    for attrs in replies:
        assert attrs[0] == "SOCKFD"
        assert "HANDLER_CLASS" not in attrs  # the reply does not echo it
        if r["kernel"].startswith("6.12."):
            assert attrs == ["SOCKFD", "MESSAGE_TYPE", "TIMEOUT", "AUTH_MODE", "PEER_IDENTITY"]
    # DONE with STATUS=13 (EACCES) fails the host's connect with EACCES
    assert r["probe_done_ack"] == "0"
    assert "Permission denied" in r["probe_connect_error"]
