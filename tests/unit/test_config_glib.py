"""tlshd.config against GLib's own key-file parser, the one ktls-utils reads its file with.

tests/oracles/glib_keyfile.c is compiled against the host's GLib and prints what the calls of
ktls-utils' src/tlshd/config.c return for each key (g_key_file_get_integer, _get_string,
_get_string_list). The same file then goes through tlshd.config, and the two must agree,
except where tlshd is knowingly kinder, each difference named in docs/migrating.md:

* an empty path is "not set" (ktls-utils would try to open "");
* trailing whitespace of a value is dropped (GLib keeps it, and the path then does not exist);
* keyring names are trimmed and empty ones skipped (ktls-utils would look up " .nvme" and "").
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tlshd.config import Config, parse_config
from tlshd.errors import ConfigError

ORACLE = Path(__file__).parents[1] / "oracles" / "glib_keyfile.c"
PATH_KEYS = ("x509.truststore", "x509.crl", "x509.certificate", "x509.private_key")
INT_KEYS = ("loglevel", "tls", "nl", "delay_done")


@pytest.fixture(scope="module")
def glib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    flags = None
    if shutil.which("gcc") and shutil.which("pkg-config"):
        found = subprocess.run(["pkg-config", "--cflags", "--libs", "glib-2.0"],
                               capture_output=True, text=True, check=False)
        flags = found.stdout.split() if found.returncode == 0 else None
    if flags is None:
        if os.environ.get("CI"):
            pytest.fail("GLib's headers are missing: scripts/setup --dev installs libglib2.0-dev")
        pytest.skip("no gcc/pkg-config/libglib2.0-dev (scripts/setup --dev installs them)")
    binary = tmp_path_factory.mktemp("glib") / "glib_keyfile"
    subprocess.run(["gcc", "-O1", "-Wall", "-Werror", "-o", str(binary), str(ORACLE), *flags],
                   check=True)
    return binary


def glib_reads(binary: Path, path: Path) -> dict[tuple[str, str, str], object] | str:
    """{(kind, group, key): value} as GLib returns it, or the load error's message."""
    out = subprocess.run([str(binary), str(path)], capture_output=True, text=True, check=True)
    if out.stdout.startswith("load-error"):
        return out.stdout
    result: dict[tuple[str, str, str], object] = {}
    for line in out.stdout.splitlines():
        kind, group, key, value = line.split(" ", 3)
        if kind == "int":
            result[(kind, group, key)] = int(value)
        elif value == "-":
            result[(kind, group, key)] = None
        elif kind == "str":
            result[(kind, group, key)] = bytes.fromhex(value[1:]).decode()
        else:
            result[(kind, group, key)] = [bytes.fromhex(v[1:]).decode() for v in value.split(",")]
    return result


def assert_agrees(binary: Path, path: Path) -> Config | None:
    expected = glib_reads(binary, path)
    try:
        cfg = parse_config(path.read_text(), path)
    except ConfigError as exc:
        assert isinstance(expected, str), f"tlshd refused what GLib loads: {exc}"
        return None
    assert not isinstance(expected, str), f"GLib refuses what tlshd loads: {expected}"
    assert cfg.loglevel == expected[("int", "debug", "loglevel")]
    assert cfg.tls_debug == expected[("int", "debug", "tls")]
    assert cfg.nl_debug == expected[("int", "debug", "nl")]
    assert cfg.delay_done == max(0, expected[("int", "debug", "delay_done")])  # type: ignore[call-overload]
    keyrings = expected[("list", "authenticate", "keyrings")]
    assert cfg.keyrings == tuple(k.strip() for k in (keyrings or []) if k.strip())  # type: ignore[attr-defined]
    for side_name, side in (("authenticate.client", cfg.client),
                            ("authenticate.server", cfg.server)):
        for key in PATH_KEYS:
            value = expected[("str", side_name, key)]
            ours = getattr(side, key.removeprefix("x509."))
            assert ours == (Path(value) if value else None), (side_name, key, value)  # type: ignore[arg-type]
    return cfg


CASES = {
    "reference advice": "[debug]\nloglevel=10\ntls=0\nnl=0\n",
    "sample file": "#\n# tlshd configuration file\n#\n\n[debug]\nloglevel=0\ntls=0\nnl=0\n\n"
                   "[authenticate]\n#keyrings= <keyring>;<keyring>;<keyring>\n\n"
                   "[authenticate.client]\n#x509.truststore= <pathname>\n",
    "indented, spaced": " [debug]\n   loglevel = 7 \n  # a comment\n\n[authenticate]\n"
                        "keyrings = .nfs ; .nvme;;\n",
    "escapes": "[authenticate.client]\nx509.truststore=\\s/etc/with space\\tand tab\n"
               "x509.crl=/etc/back\\\\slash\nx509.certificate=/etc/bad\\qescape\n"
               "x509.private_key=/etc/ends\\\n[authenticate]\nkeyrings=a\\;b;c\n",
    "list with a bad escape": "[authenticate]\nkeyrings=.nfs;\\q;.nvme\n",
    "CRLF": "[debug]\r\nloglevel=5\r\n[authenticate.server]\r\nx509.certificate=/c.pem\r\n",
    "numbers": "[debug]\nloglevel=+3\ntls=-2\nnl=08\ndelay_done=-4\n",
    "bad numbers": "[debug]\nloglevel=0x10\ntls=1.5\nnl=\ndelay_done=99999999999\n",
    "repeated": "[debug]\nloglevel=1\n[authenticate]\n[debug]\nloglevel=2\nloglevel=3\n",
    "unknown groups and keys": "[tags]\nfoo=bar\n[debug]\nverbose=1\nloglevel=1\n",
    "not a key file": "[debug]\nloglevel\n",
    "key before group": "loglevel=1\n[debug]\n",
    "empty": "",
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_tlshd_reads_what_glib_reads(glib: Path, tmp_path: Path, name: str) -> None:
    path = tmp_path / "config"
    path.write_text(CASES[name])
    assert_agrees(glib, path)


VALUE = st.text(alphabet="ab/.;\\snrtx09-+ \té=", max_size=12).filter(
    lambda v: v == v.rstrip())  # trailing whitespace: a known difference, tested below


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ints=st.lists(VALUE, min_size=4, max_size=4), keyrings=VALUE,
       paths=st.lists(VALUE, min_size=4, max_size=4))
def test_any_value_reads_the_same_as_glib(glib: Path, tmp_path: Path, ints: list[str],
                                          keyrings: str, paths: list[str]) -> None:
    lines = ["[debug]", *(f"{k}={v}" for k, v in zip(INT_KEYS, ints, strict=True)),
             "[authenticate]", f"keyrings={keyrings}", "[authenticate.server]",
             *(f"{k}={v}" for k, v in zip(PATH_KEYS, paths, strict=True))]
    path = tmp_path / "config"
    path.write_text("\n".join(lines) + "\n")
    assert_agrees(glib, path)


def test_trailing_whitespace_is_the_one_path_difference(glib: Path, tmp_path: Path) -> None:
    path = tmp_path / "config"
    path.write_text("[authenticate.server]\nx509.certificate=/etc/server.pem  \n")
    expected = glib_reads(glib, path)
    assert isinstance(expected, dict)
    assert expected[("str", "authenticate.server", "x509.certificate")] == "/etc/server.pem  "
    assert parse_config(path.read_text()).server.certificate == Path("/etc/server.pem")
