"""tlshd.agent.sandbox: what a confined handshake process can no longer do.

Each check runs ``confine`` in a forked child (it cannot be undone) and reports back over a
pipe; the parent is root with every capability, as the tests run."""

from __future__ import annotations

import ctypes
import json
import os
import platform
import re
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from tlshd import keyring
from tlshd.agent import sandbox

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="confining needs root")
UNISTD = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")


def in_confined_child(probe: Callable[[], dict[str, object]]) -> dict[str, object]:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            sandbox.confine(sandbox.resolve_user("nobody"))
            result = probe()
        except BaseException as exc:  # reported, never raised into pytest's copy
            result = {"error": repr(exc)}
        os.write(write, json.dumps(result).encode())
        os._exit(0)
    os.close(write)
    data = b""
    while chunk := os.read(read, 65536):
        data += chunk
    os.close(read)
    os.waitpid(pid, 0)
    out: dict[str, object] = json.loads(data)
    assert "error" not in out, out
    return out


def _errno_of(action: Callable[[], object]) -> int:
    try:
        action()
    except OSError as exc:
        return exc.errno or -1
    return 0


def _unshare_errno() -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    return 0 if libc.unshare(0x10000000) == 0 else ctypes.get_errno()  # CLONE_NEWUSER


def test_a_confined_process_has_no_capability_no_new_privs_and_a_seccomp_filter() -> None:
    out = in_confined_child(lambda: {k: v for k, v in sandbox.status_fields().items()
                                     if k in ("CapEff", "CapPrm", "NoNewPrivs", "Seccomp",
                                              "Uid", "Gid", "Groups")})
    print(out)
    nobody = sandbox.resolve_user("nobody")
    assert out["CapEff"] == out["CapPrm"] == "0000000000000000"
    assert out["NoNewPrivs"] == "1"
    assert out["Uid"] == "\t".join([str(nobody.uid)] * 4)
    assert out["Gid"] == "\t".join([str(nobody.gid)] * 4)
    assert out["Groups"] == ""
    if platform.machine() == "x86_64":
        assert out["Seccomp"] == "2"


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the filter is x86-64's")
def test_the_filter_refuses_netlink_and_ip_sockets_exec_and_ptrace_but_not_unix_sockets(
) -> None:
    def probe() -> dict[str, object]:
        return {
            "netlink": _errno_of(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 16)),
            "inet": _errno_of(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM)),
            "inet6": _errno_of(lambda: socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)),
            "unix": _errno_of(lambda: socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).close()),
            "pair": _errno_of(lambda: [s.close() for s in socket.socketpair()]),
            "exec": _errno_of(lambda: os.execv("/bin/true", ["true"])),
            "unshare": _unshare_errno(),
        }

    out = in_confined_child(probe)
    assert out["netlink"] == out["inet"] == out["inet6"] == 1  # EPERM
    assert out["exec"] == out["unshare"] == 1
    assert out["unix"] == out["pair"] == 0


def test_root_files_and_the_agents_keys_are_out_of_reach(tmp_path: Path) -> None:
    secret = tmp_path / "server.key"
    secret.write_bytes(b"-----BEGIN PRIVATE KEY-----\n")
    secret.chmod(0o600)
    tmp_path.chmod(0o755)  # the directory is open: only the file's mode protects it
    serial = keyring.add_key("user", "tlshd-test:sandbox", b"a secret",
                             keyring.KEY_SPEC_SESSION_KEYRING)
    try:
        def probe() -> dict[str, object]:
            try:
                keyring.read_key(serial)
                key = "read"
            except Exception as exc:
                key = type(exc).__name__
            return {"file": _errno_of(secret.read_bytes), "key": key}

        out = in_confined_child(probe)
    finally:
        keyring.revoke_key(serial)
    assert out["file"] == 13  # EACCES
    assert out["key"] == "KeyAccessError"  # the seccomp filter, and no possession anyway


def test_leaving_the_session_keyring_alone_takes_away_possession() -> None:
    """Without the filter's help: after the keyring step the key is not found by search."""
    serial = keyring.add_key("user", "tlshd-test:possession", b"x",
                             keyring.KEY_SPEC_SESSION_KEYRING)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            keyring.join_anonymous_session_keyring()
            try:
                keyring.search_key(keyring.KEY_SPEC_SESSION_KEYRING, "user",
                                   "tlshd-test:possession")
                os.write(write, b"found")
            except Exception as exc:
                os.write(write, type(exc).__name__.encode())
        finally:
            os._exit(0)
    os.close(write)
    answer = os.read(read, 100)
    os.waitpid(pid, 0)
    keyring.revoke_key(serial)
    assert answer == b"KeyNotFoundError"


def test_a_user_that_does_not_exist_or_root_is_refused() -> None:
    with pytest.raises(sandbox.SandboxError, match="no user"):
        sandbox.resolve_user("tlshd-no-such-user")
    with pytest.raises(sandbox.SandboxError, match="root"):
        sandbox.resolve_user("root")


@pytest.mark.skipif(not UNISTD.is_file(), reason="no x86-64 kernel headers (linux-libc-dev)")
def test_the_filters_system_call_numbers_are_the_kernels() -> None:
    numbers = dict(re.findall(r"#define __NR_(\w+) (\d+)", UNISTD.read_text()))
    for name, nr in {**sandbox.X86_64_DENIED, "socket": sandbox.X86_64_SOCKET}.items():
        assert int(numbers[name]) == nr, name


def test_the_program_is_whole_instructions_and_ends_in_a_return() -> None:
    program = sandbox.seccomp_program()
    assert len(program) % 8 == 0 and len(program) // 8 < 4096
    code = int.from_bytes(program[-8:-6], "little")
    assert code == 0x06  # BPF_RET
