"""tlshd.early: the group membership taken before the agent is loaded.

The kernel fails a request at once with ESRCH while nobody in the namespace listens
(net/handshake/netlink.c, handshake_genl_notify), so the agent must be a listener as early
after exec as possible: that means importing next to nothing first.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kernel_sim import genl
from kernel_sim.handshake import netlink as hsnl
from kernel_sim.profile import MAINLINE
from tlshd import early


@pytest.mark.parametrize(("argv", "expected"), [
    ([], {}),
    (["agent"], {}),
    (["run"], {}),
    (["-s", "-c", "/etc/x"], {"config": "/etc/x"}),
    (["-c/etc/x"], {"config": "/etc/x"}),
    (["--config=/etc/x", "--upcall", "kernel-sim:lab"], {"config": "/etc/x",
                                                         "upcall": "kernel-sim:lab"}),
    (["--workers", "3", "agent"], {}),
    (["doctor"], None),
    (["status", "--json"], None),
    (["demo"], None),
    (["-v"], None),
    (["-s", "--help"], None),
])
def test_only_an_agent_command_line_holds_early(argv: list[str],
                                                expected: dict[str, str] | None) -> None:
    assert early.agent_options(argv) == expected


def test_the_configured_upcall_is_read_from_the_agent_section(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text("[debug]\nupcall=netlink\n[agent]\n# upcall=x\n upcall = kernel-sim:lab \n")
    assert early._configured_upcall(str(config)) == "kernel-sim:lab"
    assert early._configured_upcall(str(tmp_path / "absent")) == "auto"


def test_family_reply_is_parsed_as_the_kernel_encodes_it() -> None:
    desc = hsnl.family_desc(MAINLINE, 0x22, (0x0B, 0x0C))
    reply = genl.ctrl_family_reply(desc, seq=1, portid=7)
    assert early._family_reply(reply) == (0x22, {"none": 0x0B, "tlshd": 0x0C})


def test_an_error_reply_is_an_oserror() -> None:
    request = early._get_family("handshake")
    with pytest.raises(OSError) as caught:
        early._family_reply(genl.nlmsg_error(-2, request, portid=7))
    assert caught.value.errno == 2


def test_nothing_heavy_is_imported_before_the_group_is_joined() -> None:
    """What the interpreter has loaded when ``hold`` runs: the standard library's smallest
    modules, not OpenSSL, cryptography, pyroute2, logging, argparse or the rest of tlshd."""
    code = ("import sys\n"
            "base = set(sys.modules)\n"  # what the interpreter (and site) loaded anyway
            "import tlshd.early as e\n"
            "e.hold(['-c', '/nonexistent'])\n"
            "added = set(sys.modules) - base\n"
            "import json\n"
            "print(json.dumps(sorted(added)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=30)
    added = set(json.loads(out.stdout))
    heavy = {"OpenSSL", "cryptography", "pyroute2", "logging", "argparse", "dataclasses",
             "json", "ssl", "typing", "inspect", "subprocess", "threading"}
    assert not added & heavy, added & heavy
    assert {m for m in added if m.startswith("tlshd")} <= {"tlshd", "tlshd.early"}
    assert len(added) < 20, sorted(added)  # socket and what it needs, struct, __future__


def test_hold_without_any_transport_is_none_not_an_error() -> None:
    assert early.hold(["--upcall", "kernel-sim:no-such-endpoint-anywhere"]) is None
