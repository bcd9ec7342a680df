"""tlshd.keyring against this host's real kernel keyrings.

Each test gets a fresh keyring linked into this process's session keyring
(created with ``keyctl newring``; cleared and unlinked afterwards), so keys are
possessed by the test process and by the ``keyctl`` commands it runs.
Payload-size limits are the kernel's: a ``user`` key holds 1..32767 bytes.
"""

from __future__ import annotations

import errno
import struct
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from tlshd import keyring
from tlshd.errors import CredentialError, KeyAccessError, KeyNotFoundError, KeyRevokedError

USER_KEY_MAX = 32767  # security/keys/user_defined.c: user_preparse
SECRET = b"do-not-log-this-payload-7f3a9c"
KEYCTL_TIMEOUT_S = 10


def keyctl(*args: str) -> str:
    done = subprocess.run(["keyctl", *args], capture_output=True, text=True, check=True,
                          timeout=KEYCTL_TIMEOUT_S)
    return done.stdout.strip()


@pytest.fixture
def ring() -> Iterator[int]:
    session = keyring.keyring_id(keyring.KEY_SPEC_SESSION_KEYRING, create=True)
    serial = int(keyctl("newring", "tlshd-test", str(session)))
    yield serial
    keyctl("clear", str(serial))
    keyctl("unlink", str(serial), str(session))


def in_proc_keys(serial: int) -> bool:
    with open("/proc/keys") as f:
        return any(line.startswith(f"{serial:08x} ") for line in f)


def proc_keys_line(serial: int) -> str:
    with open("/proc/keys") as f:
        return next(line for line in f if line.startswith(f"{serial:08x} "))


# --- add / read ---------------------------------------------------------------------


def test_added_user_key_reads_back_its_payload(ring: int) -> None:
    serial = keyring.add_key("user", "tlshd:test", b"payload\x00\xff", ring)

    assert keyring.read_key(serial) == b"payload\x00\xff"


@pytest.mark.parametrize("size", [1, 4096, USER_KEY_MAX])
def test_payload_round_trip_up_to_the_user_key_maximum(ring: int, size: int) -> None:
    payload = bytes(i * 7 % 251 for i in range(size))
    serial = keyring.add_key("user", f"size-{size}", payload, ring)

    assert keyring.read_key(serial) == payload


def test_sixty_kib_payload_round_trips_through_a_big_key(ring: int) -> None:
    payload = bytes(i % 253 for i in range(60 * 1024))
    try:
        serial = keyring.add_key("big_key", "tlshd:big", payload, ring)
    except CredentialError as exc:
        if exc.status == errno.ENODEV:
            pytest.skip("this kernel has no big_key type (CONFIG_BIG_KEYS)")
        raise

    assert keyring.read_key(serial) == payload


def test_user_key_over_the_maximum_is_refused_with_einval(ring: int) -> None:
    with pytest.raises(CredentialError) as caught:
        keyring.add_key("user", "too-big", b"x" * (USER_KEY_MAX + 1), ring)

    assert caught.value.status == errno.EINVAL


def test_zero_byte_payload_reads_back_empty(ring: int) -> None:
    # A user key cannot be empty (EINVAL); an empty keyring's payload is 0 bytes.
    empty = keyring.add_key("keyring", "tlshd:empty", b"", ring)

    assert keyring.read_key(empty) == b""


def test_keyring_payload_lists_its_keys_serials(ring: int) -> None:
    serial = keyring.add_key("user", "member", b"m", ring)

    assert keyring.read_key(ring) == struct.pack("=i", serial)


def test_adding_the_same_description_again_updates_the_key(ring: int) -> None:
    first = keyring.add_key("user", "same", b"one", ring)

    second = keyring.add_key("user", "same", b"two", ring)

    assert second == first
    assert keyring.read_key(first) == b"two"


def test_key_added_by_keyctl_reads_back_through_the_module(ring: int) -> None:
    serial = int(keyctl("add", "user", "from-cli", "cli payload", str(ring)))

    assert keyring.read_key(serial) == b"cli payload"


# --- describe --------------------------------------------------------------------------


def test_describe_parses_type_uid_gid_perm_and_description(ring: int) -> None:
    serial = keyring.add_key("user", "tlshd:peer:abc", b"x", ring)
    keyctl("setperm", str(serial), "0x3f0b0000")

    info = keyring.describe_key(serial)

    assert info == keyring.KeyDescription(serial=serial, key_type="user", uid=0, gid=0,
                                          perm=0x3F0B0000, description="tlshd:peer:abc")


def test_description_containing_semicolons_is_kept_whole(ring: int) -> None:
    serial = keyring.add_key("user", "a;b;;c;", b"x", ring)

    info = keyring.describe_key(serial)

    assert (info.key_type, info.description) == ("user", "a;b;;c;")


def test_describe_agrees_with_keyctl_rdescribe(ring: int) -> None:
    serial = keyring.add_key("user", "x;y", b"x", ring)
    key_type, uid, gid, perm, description = keyctl("rdescribe", str(serial)).split(";", 4)

    info = keyring.describe_key(serial)

    assert (info.key_type, info.uid, info.gid, info.perm, info.description) == (
        key_type, int(uid), int(gid), int(perm, 16), description)


def test_describe_of_a_keyring(ring: int) -> None:
    info = keyring.describe_key(ring)

    assert (info.key_type, info.description) == ("keyring", "tlshd-test")


def test_describe_of_a_maximum_length_description(ring: int) -> None:
    description = "d" * 4095  # KEY_MAX_DESC_SIZE - 1
    serial = keyring.add_key("user", description, b"x", ring)

    assert keyring.describe_key(serial).description == description


# --- search / link / unlink --------------------------------------------------------------


def test_search_finds_a_key_by_type_and_description(ring: int) -> None:
    serial = keyring.add_key("user", "findme", b"x", ring)
    keyring.add_key("user", "other", b"y", ring)

    assert keyring.search_key(ring, "user", "findme") == serial


def test_search_for_a_missing_description_raises_key_not_found(ring: int) -> None:
    keyring.add_key("user", "present", b"x", ring)

    with pytest.raises(KeyNotFoundError) as caught:
        keyring.search_key(ring, "user", "absent")

    assert caught.value.status == errno.ENOKEY


def test_search_matches_type_too(ring: int) -> None:
    keyring.add_key("user", "typed", b"x", ring)

    with pytest.raises(KeyNotFoundError):
        keyring.search_key(ring, "logon", "typed")


def test_linked_key_is_found_in_the_second_keyring(ring: int) -> None:
    other = keyring.add_key("keyring", "second", b"", ring)
    serial = keyring.add_key("user", "shared", b"x", ring)

    keyring.link_key(serial, other)

    assert keyring.search_key(other, "user", "shared") == serial
    assert keyring.read_key(other) == struct.pack("=i", serial)


def test_unlinked_key_is_no_longer_found_there(ring: int) -> None:
    other = keyring.add_key("keyring", "second", b"", ring)
    serial = keyring.add_key("user", "shared", b"x", ring)
    keyring.link_key(serial, other)

    keyring.unlink_key(serial, other)

    assert keyring.read_key(other) == b""
    with pytest.raises(KeyNotFoundError):
        keyring.search_key(other, "user", "shared")
    assert keyring.search_key(ring, "user", "shared") == serial


def test_unlinking_a_key_that_is_not_linked_raises_key_not_found(ring: int) -> None:
    other = keyring.add_key("keyring", "second", b"", ring)
    serial = keyring.add_key("user", "loner", b"x", ring)

    with pytest.raises(KeyNotFoundError):
        keyring.unlink_key(serial, other)


# --- timeout / revoke ---------------------------------------------------------------------


def test_set_timeout_shows_as_expiry_in_proc_keys(ring: int) -> None:
    serial = keyring.add_key("user", "timed", b"x", ring)
    assert proc_keys_line(serial).split()[3] == "perm"

    keyring.set_key_timeout(serial, 600)

    assert proc_keys_line(serial).split()[3] in ("9m", "10m")


def test_key_past_its_timeout_raises_revoked_error_with_ekeyexpired(ring: int) -> None:
    serial = keyring.add_key("user", "short", b"x", ring)
    keyring.set_key_timeout(serial, 1)
    deadline = time.monotonic() + 5

    while True:
        try:
            keyring.read_key(serial)
        except KeyRevokedError as exc:
            caught = exc
            break
        assert time.monotonic() < deadline, "key did not expire within 5 s"
        time.sleep(0.05)

    assert caught.status == errno.EKEYEXPIRED


def test_timeout_zero_clears_the_expiry(ring: int) -> None:
    serial = keyring.add_key("user", "timed", b"x", ring)
    keyring.set_key_timeout(serial, 600)

    keyring.set_key_timeout(serial, 0)

    assert proc_keys_line(serial).split()[3] == "perm"


def test_revoked_key_read_raises_revoked_error_with_ekeyrevoked(ring: int) -> None:
    serial = keyring.add_key("user", "revokable", b"x", ring)

    keyring.revoke_key(serial)

    with pytest.raises(KeyRevokedError) as caught:
        keyring.read_key(serial)
    assert caught.value.status == errno.EKEYREVOKED


def test_revoked_key_describe_raises_revoked_error(ring: int) -> None:
    serial = keyring.add_key("user", "revokable", b"x", ring)
    keyring.revoke_key(serial)

    with pytest.raises(KeyRevokedError) as caught:
        keyring.describe_key(serial)

    assert caught.value.status == errno.EKEYREVOKED


# --- error mapping --------------------------------------------------------------------------


def test_missing_serial_raises_key_not_found_with_enokey(ring: int) -> None:
    serial = keyring.add_key("user", "gone", b"x", ring)
    keyctl("invalidate", str(serial))
    deadline = time.monotonic() + 5
    while in_proc_keys(serial):
        assert time.monotonic() < deadline, "invalidated key was not garbage collected"
        time.sleep(0.05)

    with pytest.raises(KeyNotFoundError) as caught:
        keyring.read_key(serial)

    assert caught.value.status == errno.ENOKEY
    assert str(serial) in str(caught.value)


def test_serial_that_never_existed_raises_key_not_found() -> None:
    with pytest.raises(KeyNotFoundError) as caught:
        keyring.describe_key(0x7FFFFFFF)

    assert caught.value.status == errno.ENOKEY


def test_key_without_read_permission_raises_access_error_with_eacces(ring: int) -> None:
    serial = keyring.add_key("user", "view-only", SECRET, ring)
    keyctl("setperm", str(serial), "0x01010000")  # possessor: view; user: view

    with pytest.raises(KeyAccessError) as caught:
        keyring.read_key(serial)

    assert caught.value.status == errno.EACCES
    assert keyring.describe_key(serial).perm == 0x01010000


def test_adding_to_a_missing_keyring_raises_key_not_found(ring: int) -> None:
    with pytest.raises(KeyNotFoundError):
        keyring.add_key("user", "orphan", b"x", 0x7FFFFFFF)


def test_unknown_key_type_keeps_the_kernels_errno(ring: int) -> None:
    with pytest.raises(CredentialError) as caught:
        keyring.add_key("no-such-type", "x", b"x", ring)

    assert type(caught.value) is CredentialError
    assert caught.value.status == errno.ENODEV


def test_process_keyring_is_created_on_request() -> None:
    serial = keyring.keyring_id(keyring.KEY_SPEC_PROCESS_KEYRING, create=True)

    assert keyring.keyring_id(keyring.KEY_SPEC_PROCESS_KEYRING) == serial
    assert keyring.describe_key(serial).key_type == "keyring"


def test_session_keyring_id_matches_keyctl() -> None:
    serial = keyring.keyring_id(keyring.KEY_SPEC_SESSION_KEYRING, create=True)

    assert int(keyctl("id", "@s")) == serial


# --- secrets stay out of messages ----------------------------------------------------------


def _errors_with_secret_payload(ring: int) -> list[CredentialError]:
    errors: list[CredentialError] = []
    view_only = keyring.add_key("user", "secret-view-only", SECRET, ring)
    keyctl("setperm", str(view_only), "0x01010000")
    revoked = keyring.add_key("user", "secret-revoked", SECRET, ring)
    keyring.revoke_key(revoked)
    attempts: list[Callable[[], object]] = [
        lambda: keyring.read_key(view_only),
        lambda: keyring.read_key(revoked),
        lambda: keyring.add_key("user", "to-nowhere", SECRET, 0x7FFFFFFF),
        lambda: keyring.add_key("no-such-type", "typed", SECRET, ring),
        lambda: keyring.add_key("user", "oversized", SECRET * 2000, ring),
        lambda: keyring.add_key("user", "into-revoked", SECRET, revoked),
    ]
    for attempt in attempts:
        with pytest.raises(CredentialError) as caught:
            attempt()
        errors.append(caught.value)
    return errors


def test_error_messages_never_contain_the_payload(ring: int) -> None:
    errors = _errors_with_secret_payload(ring)

    for error in errors:
        text = str(error) + repr(error) + repr(error.args)
        assert SECRET.decode() not in text
        assert SECRET.hex() not in text
    assert len(errors) == 6


def test_a_process_keyring_made_before_fork_is_not_the_childs() -> None:
    """Why keyrings are the business of the worker that ACCEPTs: the kernel links a request's
    keyring into the accepting process's process keyring, and a forked child does not inherit
    its parent's (reference section 5.5 left this open; settled on this host's kernel)."""
    import ctypes
    import os

    libc = ctypes.CDLL(None, use_errno=True)
    serial = libc.syscall(250, ctypes.c_long(0), ctypes.c_long(-2), ctypes.c_long(1))
    assert serial > 0
    pid = os.fork()
    if pid == 0:
        child = libc.syscall(250, ctypes.c_long(0), ctypes.c_long(-2), ctypes.c_long(0))
        os._exit(0 if child < 0 and ctypes.get_errno() == errno.ENOKEY else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
