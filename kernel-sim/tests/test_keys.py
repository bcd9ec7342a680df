"""kernel_sim.keys on the host's real keyrings: each call does what keyctl(2) does."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from kernel_sim import keys

DER = bytes.fromhex("3082010a0282010100") + bytes(range(64))


@pytest.fixture
def keyring() -> Iterator[int]:
    """A scratch keyring in this process's keyring (possessed); gone after the test."""
    serial = keys.new_keyring(f"ksim-test-{os.getpid()}", keys.KEY_SPEC_PROCESS_KEYRING)
    yield serial
    for member in keys.keyring_members(serial):
        try:
            keys.invalidate(member)
        except OSError:
            continue
    keys.invalidate(serial)


def errno_of(excinfo: pytest.ExceptionInfo[OSError]) -> int | None:
    return excinfo.value.errno


def test_a_user_key_reads_back_its_der_payload(keyring: int) -> None:
    serial = keys.add_key("user", "TLS cert nfs.example", DER, keyring)

    assert keys.read_key(serial) == DER


def test_describe_gives_type_owner_perm_and_the_description_after_the_fourth_semicolon(
        keyring: int) -> None:
    serial = keys.add_key("user", "odd;description;with;semicolons", b"x", keyring)
    keys.set_perm(serial, keys.KEY_POS_ALL | keys.KEY_USR_VIEW)

    desc = keys.describe_key(serial)

    assert (desc.type, desc.uid, desc.gid) == ("user", os.getuid(), os.getgid())
    assert desc.perm == keys.KEY_POS_ALL | keys.KEY_USR_VIEW
    assert desc.description == "odd;description;with;semicolons"


def test_a_new_keyring_lists_its_members_in_order(keyring: int) -> None:
    first = keys.add_key("user", "a", b"1", keyring)
    second = keys.add_key("user", "b", b"2", keyring)

    assert sorted(keys.keyring_members(keyring)) == sorted([first, second])
    assert keys.describe_key(keyring).type == "keyring"


def test_add_key_with_the_same_type_and_description_updates_the_key(keyring: int) -> None:
    serial = keys.add_key("user", "psk-like", b"old", keyring)

    again = keys.add_key("user", "psk-like", b"new", keyring)

    assert again == serial and keys.read_key(serial) == b"new"


def test_search_matches_the_exact_description_recursively(keyring: int) -> None:
    nested = keys.new_keyring("nested", keyring)
    serial = keys.add_key("user", "NVMe0R01 host sub", b"k" * 32, nested)

    assert keys.search(keyring, "user", "NVMe0R01 host sub") == serial
    with pytest.raises(OSError) as info:
        keys.search(keyring, "user", "NVMe0R01 host")  # user keys need the whole name
    assert errno_of(info) == errno.ENOKEY


def test_search_of_a_missing_key_is_enokey(keyring: int) -> None:
    with pytest.raises(OSError) as info:
        keys.search(keyring, "user", "nothing here")

    assert errno_of(info) == errno.ENOKEY


def test_reading_or_describing_an_unknown_serial_is_enokey() -> None:
    unknown = 0x7FFFFFF0

    for call in (keys.read_key, keys.describe_key):
        with pytest.raises(OSError) as info:
            call(unknown)
        assert errno_of(info) == errno.ENOKEY


def test_a_revoked_key_fails_read_describe_and_search_with_ekeyrevoked(keyring: int) -> None:
    serial = keys.add_key("user", "revoke me", b"x", keyring)

    keys.revoke(serial)

    for call in (keys.read_key, keys.describe_key):
        with pytest.raises(OSError) as info:
            call(serial)
        assert errno_of(info) == errno.EKEYREVOKED
    with pytest.raises(OSError) as info:
        keys.search(keyring, "user", "revoke me")
    assert errno_of(info) == errno.EKEYREVOKED


def test_link_puts_a_key_in_a_second_keyring_and_unlink_takes_it_out(keyring: int) -> None:
    other = keys.new_keyring("other", keyring)
    serial = keys.add_key("user", "shared", b"x", keyring)

    keys.link(serial, other)

    assert serial in keys.keyring_members(other)
    keys.unlink(serial, other)
    assert serial not in keys.keyring_members(other)
    assert keys.read_key(serial) == b"x"  # still linked from the first keyring


def test_reading_a_key_without_read_permission_that_is_not_possessed_is_eacces(
        keyring: int) -> None:
    serial = keys.add_key("user", "private", b"secret", keyring)
    keys.set_perm(serial, keys.KEY_POS_VIEW | keys.KEY_USR_VIEW)  # no SEARCH: not possessed

    with pytest.raises(OSError) as info:
        keys.read_key(serial)

    assert errno_of(info) == errno.EACCES
    assert keys.describe_key(serial).description == "private"  # VIEW still allows this


def test_link_into_a_keyring_without_write_permission_is_eacces(keyring: int) -> None:
    locked = keys.new_keyring("locked", keyring)
    serial = keys.add_key("user", "k", b"x", keyring)
    keys.set_perm(locked, keys.KEY_POS_VIEW | keys.KEY_POS_SEARCH | keys.KEY_USR_VIEW)

    with pytest.raises(OSError) as info:
        keys.link(serial, locked)

    assert errno_of(info) == errno.EACCES


def test_keyring_names_starting_with_a_dot_are_the_kernels_eperm() -> None:
    with pytest.raises(OSError) as info:
        keys.new_keyring(".nvme", keys.KEY_SPEC_PROCESS_KEYRING)

    assert errno_of(info) == errno.EPERM


def test_this_host_has_no_psk_key_type_so_kernel_sim_uses_user_keys(keyring: int) -> None:
    try:
        serial = keys.add_key("psk", "NVMe0R01 host sub", b"k" * 32, keyring)
    except OSError as exc:
        assert exc.errno == errno.ENODEV  # key_type_lookup: no such type
        return
    keys.invalidate(serial)
    pytest.skip("this host has nvme-keyring loaded; the user-type model is still used")


def test_another_process_of_the_same_user_reads_a_key_with_user_read_permission(
        keyring: int) -> None:
    serial = keys.add_key("user", "for the agent", b"payload", keyring)
    keys.set_perm(serial, keys.KEY_POS_ALL | keys.KEY_USR_VIEW | keys.KEY_USR_READ)
    if shutil.which("keyctl") is None:
        pytest.skip("keyctl(1) is not installed")

    out = subprocess.run(["keyctl", "pipe", str(serial)], capture_output=True, timeout=10,
                         check=False)

    assert out.returncode == 0 and out.stdout == b"payload"


def test_get_keyring_id_resolves_a_special_keyring() -> None:
    assert keys.get_keyring_id(keys.KEY_SPEC_PROCESS_KEYRING, create=True) > 0
