"""tlshd.config: the reference agent's key-file format (ktls-utils tlshd.conf) plus [agent].

Every test writes a real file and reads it back through ``load_config`` (or
feeds the same text to ``parse_config``), so line numbers in messages are the
ones an administrator would see in an editor.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from tlshd import config
from tlshd.config import Config, X509Side, load_config, parse_config
from tlshd.errors import ConfigError

# The layout of ktls-utils' shipped tlshd.conf, with every key given a value.
REFERENCE_CONF = """\
#
# tlshd configuration file
#

[debug]
loglevel=3
tls=5
nl=1

[authenticate]
keyrings=.nfs;.nvme; .nvmf

[authenticate.client]
x509.truststore=/etc/pki/client-ca.pem
x509.crl=/etc/pki/client.crl
x509.certificate=/etc/pki/client.crt
x509.private_key=/etc/pki/client.key
x509.pq.certificate=/etc/pki/client-mldsa.crt
x509.pq.private_key=/etc/pki/client-mldsa.key

[authenticate.server]
x509.truststore=/etc/pki/server-ca.pem
x509.crl=/etc/pki/server.crl
x509.certificate=/etc/pki/server.crt
x509.private_key=/etc/pki/server.key
x509.pq.certificate=/etc/pki/server-mldsa.crt
x509.pq.private_key=/etc/pki/server-mldsa.key

[agent]
workers=4
handshake_timeout_ms=2500
require_client_cert=true
upcall=kernel-sim:lab
"""


def write(tmp_path: Path, text: str, name: str = "tlshd.conf") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def line_of(text: str, needle: str) -> int:
    """1-based line number of the first line containing ``needle``."""
    return next(n for n, line in enumerate(text.splitlines(), 1) if needle in line)


# --- good files ------------------------------------------------------------------


def test_reference_file_with_every_key_loads_every_value(tmp_path: Path) -> None:
    path = write(tmp_path, REFERENCE_CONF)

    cfg = load_config(path)

    assert (cfg.loglevel, cfg.tls_debug, cfg.nl_debug) == (3, 5, 1)
    assert cfg.keyrings == (".nfs", ".nvme", ".nvmf")
    assert cfg.client == X509Side(
        truststore=Path("/etc/pki/client-ca.pem"), crl=Path("/etc/pki/client.crl"),
        certificate=Path("/etc/pki/client.crt"), private_key=Path("/etc/pki/client.key"),
        pq_certificate=Path("/etc/pki/client-mldsa.crt"),
        pq_private_key=Path("/etc/pki/client-mldsa.key"))
    assert cfg.server == X509Side(
        truststore=Path("/etc/pki/server-ca.pem"), crl=Path("/etc/pki/server.crl"),
        certificate=Path("/etc/pki/server.crt"), private_key=Path("/etc/pki/server.key"),
        pq_certificate=Path("/etc/pki/server-mldsa.crt"),
        pq_private_key=Path("/etc/pki/server-mldsa.key"))
    assert (cfg.workers, cfg.handshake_timeout_ms) == (4, 2500)
    assert cfg.require_client_cert is True
    assert cfg.upcall == "kernel-sim:lab"
    assert cfg.path == path


def test_post_quantum_keys_are_accepted_without_warnings(tmp_path: Path) -> None:
    path = write(tmp_path, REFERENCE_CONF)

    cfg = load_config(path)

    assert cfg.warnings == ()


def test_shipped_file_with_everything_commented_out_gives_defaults(tmp_path: Path) -> None:
    text = "\n".join(
        line if not line or line.startswith(("[", "#")) else "#" + line
        for line in REFERENCE_CONF.splitlines()
    )
    path = write(tmp_path, text)

    cfg = load_config(path)

    assert cfg == Config(path=path)


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "")

    cfg = load_config(path)

    assert cfg == Config(path=path)
    assert (cfg.workers, cfg.handshake_timeout_ms, cfg.upcall) == (0, 10_000, "auto")
    assert cfg.require_client_cert is False
    assert cfg.client == cfg.server == X509Side()


def test_comments_blank_lines_and_indentation_are_ignored(tmp_path: Path) -> None:
    text = (
        "# leading comment\n"
        "\n"
        "   \t\n"
        "  [debug]  \n"
        "   # indented comment with key=value inside\n"
        "\tloglevel = 6 \n"
        "#nl=99\n"
    )
    path = write(tmp_path, text)

    cfg = load_config(path)

    assert cfg.loglevel == 6
    assert cfg.nl_debug == 0
    assert cfg.warnings == ()


@pytest.mark.parametrize(
    ("group", "key", "value", "attr", "expected"),
    [
        ("debug", "loglevel", "0", "loglevel", 0),
        ("debug", "loglevel", "7", "loglevel", 7),
        ("debug", "tls", "0", "tls_debug", 0),
        ("debug", "tls", "99", "tls_debug", 99),
        ("debug", "nl", "99", "nl_debug", 99),
        ("agent", "workers", "0", "workers", 0),
        ("agent", "workers", "256", "workers", 256),
        ("agent", "handshake_timeout_ms", "1", "handshake_timeout_ms", 1),
        ("agent", "handshake_timeout_ms", "3600000", "handshake_timeout_ms", 3_600_000),
        ("agent", "require_client_cert", "true", "require_client_cert", True),
        ("agent", "require_client_cert", "1", "require_client_cert", True),
        ("agent", "require_client_cert", "false", "require_client_cert", False),
        ("agent", "require_client_cert", "0", "require_client_cert", False),
        ("agent", "cn_fallback", "true", "cn_fallback", True),
        ("agent", "cn_fallback", "false", "cn_fallback", False),
        ("agent", "upcall", "auto", "upcall", "auto"),
        ("agent", "upcall", "netlink", "upcall", "netlink"),
        ("agent", "upcall", "kernel-sim", "upcall", "kernel-sim"),
        ("agent", "upcall", "kernel-sim:ns1", "upcall", "kernel-sim:ns1"),
    ],
)
def test_good_value_at_the_edge_of_its_range_is_accepted(
    tmp_path: Path, group: str, key: str, value: str, attr: str, expected: object
) -> None:
    path = write(tmp_path, f"[{group}]\n{key}={value}\n")

    cfg = load_config(path)

    assert getattr(cfg, attr) == expected
    assert cfg.warnings == ()


def test_keyrings_list_drops_empty_items_and_whitespace(tmp_path: Path) -> None:
    path = write(tmp_path, "[authenticate]\nkeyrings= .nfs ;;.nvme;\n")

    cfg = load_config(path)

    assert cfg.keyrings == (".nfs", ".nvme")


def test_single_keyring_without_separator_is_a_one_item_list(tmp_path: Path) -> None:
    path = write(tmp_path, "[authenticate]\nkeyrings=.nfs\n")

    assert load_config(path).keyrings == (".nfs",)


def test_value_keeps_everything_after_the_first_equals_sign(tmp_path: Path) -> None:
    path = write(tmp_path, "[authenticate.client]\nx509.certificate=/srv/a=b.pem\n")

    assert load_config(path).client.certificate == Path("/srv/a=b.pem")


def test_repeated_group_is_merged(tmp_path: Path) -> None:
    text = "[debug]\nloglevel=2\n[agent]\nworkers=3\n[debug]\nnl=4\n"
    path = write(tmp_path, text)

    cfg = load_config(path)

    assert (cfg.loglevel, cfg.nl_debug, cfg.workers) == (2, 4, 3)


def test_repeated_key_last_one_wins(tmp_path: Path) -> None:
    path = write(tmp_path, "[agent]\nworkers=2\nworkers=5\n")

    assert load_config(path).workers == 5


def test_client_and_server_sides_are_independent(tmp_path: Path) -> None:
    text = "[authenticate.server]\nx509.certificate=/s.crt\nx509.private_key=/s.key\n"
    path = write(tmp_path, text)

    cfg = load_config(path)

    assert cfg.client == X509Side()
    assert cfg.server == X509Side(certificate=Path("/s.crt"), private_key=Path("/s.key"))


# --- bad values ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [("loglevel", "verbose"), ("loglevel", "1.5"), ("loglevel", ""), ("tls", "0x10"),
     ("nl", "abc"), ("delay_done", "2s"), ("loglevel", "99999999999")],
)
def test_bad_debug_integer_is_zero_and_a_warning_like_ktls_utils(
    tmp_path: Path, key: str, value: str
) -> None:
    # ktls-utils src/tlshd/config.c: g_key_file_get_integer(..., NULL) "return zero if the key
    # isn't present or the specified key value is invalid"; the agent starts.
    path = write(tmp_path, f"# header\n[debug]\n{key}={value}\n")

    cfg = load_config(path)

    assert (cfg.loglevel, cfg.tls_debug, cfg.nl_debug, cfg.delay_done) == (0, 0, 0, 0)
    assert len(cfg.warnings) == 1
    assert cfg.warnings[0].startswith(f"{path}:3: [debug] {key}: ")
    assert "is not an integer" in cfg.warnings[0]


@pytest.mark.parametrize(
    ("value", "expected"),
    [("10", 10), ("8", 8), ("-1", -1), ("+3", 3), ("7 trailing words", 7), ("100", 100),
     ("2147483647", 2**31 - 1)],
)
def test_debug_levels_take_any_integer_like_glib(tmp_path: Path, value: str,
                                                 expected: int) -> None:
    # The reference's shipped advice is loglevel=10; GLib reads a C int, digits then optional
    # whitespace and anything after it.
    cfg = load_config(write(tmp_path, f"[debug]\nloglevel={value}\ntls={value}\nnl={value}\n"))
    assert (cfg.loglevel, cfg.tls_debug, cfg.nl_debug) == (expected,) * 3
    assert cfg.warnings == ()


@pytest.mark.parametrize(("value", "expected"), [("3", 3), ("0", 0), ("-5", 0)])
def test_delay_done_is_seconds_and_negative_means_off(tmp_path: Path, value: str,
                                                      expected: int) -> None:
    # ktls-utils config.c: tlshd_delay_done = tmp > 0 ? (unsigned int)tmp : 0
    cfg = load_config(write(tmp_path, f"[debug]\ndelay_done={value}\n"))
    assert cfg.delay_done == expected and cfg.warnings == ()


@pytest.mark.parametrize(
    ("group", "key", "value"),
    [
        ("agent", "workers", "257"),
        ("agent", "workers", "-1"),
        ("agent", "workers", "four"),
        ("agent", "handshake_timeout_ms", "0"),
        ("agent", "handshake_timeout_ms", "3600001"),
        ("agent", "handshake_timeout_ms", "10s"),
    ],
)
def test_bad_integer_names_file_line_group_and_key(
    tmp_path: Path, group: str, key: str, value: str
) -> None:
    text = f"# header\n[{group}]\n{key}={value}\n"
    path = write(tmp_path, text)

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    message = str(caught.value)
    assert f"{path}:3" in message
    assert f"[{group}] {key}" in message
    assert repr(value) in message
    assert caught.value.where == f"{path}:3 [{group}] {key}"
    assert caught.value.status == errno.EINVAL


@pytest.mark.parametrize("value", ["maybe", "2", "", "on-ish"])
def test_bad_boolean_names_file_line_group_and_key(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, f"[agent]\nworkers=1\nrequire_client_cert={value}\n")

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert caught.value.where == f"{path}:3 [agent] require_client_cert"
    assert "true or false" in str(caught.value)


@pytest.mark.parametrize("value", ["", "kernel", "tcp", "Netlink", "sim:foo"])
def test_bad_upcall_names_file_line_group_and_key(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, f"[agent]\nupcall={value}\n")

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert caught.value.where == f"{path}:2 [agent] upcall"


@pytest.mark.parametrize("value", ["kernel-simulator", "kernel-sim-lab"])
def test_upcall_that_only_starts_with_kernel_sim_is_rejected(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, f"[agent]\nupcall={value}\n")

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert caught.value.where == f"{path}:2 [agent] upcall"


@pytest.mark.parametrize("side", ["authenticate.client", "authenticate.server"])
@pytest.mark.parametrize(
    "key", ["x509.truststore", "x509.crl", "x509.certificate", "x509.private_key"]
)
def test_empty_path_is_ignored_with_a_warning_naming_file_line_group_and_key(
    tmp_path: Path, side: str, key: str
) -> None:
    text = f"[{side}]\n\n{key}=   \n"
    path = write(tmp_path, text)

    cfg = load_config(path)

    assert cfg.client == cfg.server == X509Side()
    assert cfg.warnings == (f"{path}:3: [{side}] {key}: empty path; the key is ignored",)


def test_error_line_number_counts_comments_and_blank_lines(tmp_path: Path) -> None:
    text = REFERENCE_CONF.replace("workers=4", "workers=many")
    path = write(tmp_path, text)

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert caught.value.where == f"{path}:{line_of(text, 'workers=many')} [agent] workers"


def test_integer_with_leading_zero_reads_as_decimal_like_glib(tmp_path: Path) -> None:
    path = write(tmp_path, "[debug]\ntls=08\n")

    assert load_config(path).tls_debug == 8


# --- syntax errors -------------------------------------------------------------------


@pytest.mark.parametrize("line", ["loglevel 3", "[debug", "debug]", "just words"])
def test_line_that_is_neither_group_nor_key_names_file_and_line(
    tmp_path: Path, line: str
) -> None:
    path = write(tmp_path, f"[debug]\nloglevel=1\n{line}\n")

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert caught.value.where == f"{path}:3"
    assert str(caught.value).startswith(f"{path}:3: ")


def test_key_before_any_group_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "# comment\n\nloglevel=3\n[debug]\n")

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert caught.value.where == f"{path}:3"
    assert "outside any [group]" in str(caught.value)


def test_text_without_a_path_is_named_config_in_messages() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config("[agent]\nworkers=x\n")

    assert caught.value.where == "<config>:2 [agent] workers"


# --- unknown keys and groups -------------------------------------------------------


def test_unknown_key_in_known_group_is_a_warning_naming_file_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[debug]\nloglevel=1\nverbosity=9\n")

    cfg = load_config(path)

    assert cfg.loglevel == 1
    assert cfg.warnings == (f"{path}:3: [debug] verbosity: unknown key, ignored",)


def test_known_key_in_the_wrong_group_is_a_warning(tmp_path: Path) -> None:
    path = write(tmp_path, "[debug]\nworkers=2\n")

    cfg = load_config(path)

    assert cfg.workers == 0
    assert cfg.warnings == (f"{path}:2: [debug] workers: unknown key, ignored",)


def test_keys_of_an_unknown_group_are_warnings_naming_file_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[debug]\nnl=2\n\n[future.feature]\nknob=1\nother=x\n")

    cfg = load_config(path)

    assert cfg.nl_debug == 2
    assert cfg.warnings == (
        f"{path}:5: [future.feature] knob: unknown key, ignored",
        f"{path}:6: [future.feature] other: unknown key, ignored",
    )


def test_bad_value_in_an_unknown_group_is_not_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "[other]\nloglevel=not-a-number\n")

    cfg = load_config(path)

    assert cfg.loglevel == 0
    assert len(cfg.warnings) == 1


# --- finding the file ---------------------------------------------------------------


def test_explicit_path_that_does_not_exist_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.conf"

    with pytest.raises(ConfigError) as caught:
        load_config(missing)

    assert caught.value.where == str(missing)
    assert str(caught.value).startswith(f"{missing}: ")


def test_explicit_path_is_used_even_when_defaults_exist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    default = write(tmp_path, "[agent]\nworkers=1\n", "default.conf")
    explicit = write(tmp_path, "[agent]\nworkers=2\n", "explicit.conf")
    monkeypatch.setattr(config, "DEFAULT_PATHS", (default,))

    cfg = load_config(explicit)

    assert (cfg.workers, cfg.path) == (2, explicit)


def test_explicit_path_that_is_a_directory_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path)

    assert caught.value.where == str(tmp_path)


def test_no_file_at_all_gives_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "DEFAULT_PATHS", (tmp_path / "tlshd.conf", tmp_path / "config"))

    cfg = load_config()

    assert cfg.path is None and cfg.warnings == ()
    assert cfg == Config(notices=cfg.notices)
    assert "using the defaults" in cfg.notices[0]


def test_legacy_path_wins_with_the_relocation_notice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ktls-utils 1.4.0 src/tlshd/main.c: tlshd_config_init("/etc/tlshd.conf", true) first,
    # then tlshd_log_notice("Please relocate /etc/tlshd.conf to /etc/tlshd/config").
    (tmp_path / "tlshd").mkdir()
    current = write(tmp_path, "[agent]\nworkers=1\n", "tlshd/config")
    legacy = write(tmp_path, "[agent]\nworkers=2\n", "tlshd.conf")
    monkeypatch.setattr(config, "DEFAULT_PATHS", (legacy, current))

    cfg = load_config()

    assert (cfg.workers, cfg.path) == (2, legacy)
    assert cfg.notices == (f"Please relocate {legacy} to /etc/tlshd/config",)


def test_current_path_is_read_when_there_is_no_legacy_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "tlshd").mkdir()
    current = write(tmp_path, "[agent]\nworkers=1\n", "tlshd/config")
    monkeypatch.setattr(config, "DEFAULT_PATHS", (tmp_path / "tlshd.conf", current))

    cfg = load_config()

    assert (cfg.workers, cfg.path, cfg.notices) == (1, current, ())


def test_legacy_file_that_glib_refuses_falls_through_to_the_current_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # tlshd_config_init(..., legacy=true) fails quietly and main() goes on to /etc/tlshd/config
    (tmp_path / "tlshd").mkdir()
    current = write(tmp_path, "[agent]\nworkers=1\n", "tlshd/config")
    legacy = write(tmp_path, "this is not a key file\n", "tlshd.conf")
    monkeypatch.setattr(config, "DEFAULT_PATHS", (legacy, current))

    cfg = load_config()

    assert (cfg.workers, cfg.path) == (1, current)
    assert f"{legacy}:1" in cfg.warnings[0] and "reading" in cfg.warnings[0]


def test_errors_in_a_default_file_name_that_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    legacy = write(tmp_path, "[agent]\nworkers=lots\n", "config")
    monkeypatch.setattr(config, "DEFAULT_PATHS", (tmp_path / "absent", legacy))

    with pytest.raises(ConfigError) as caught:
        load_config()

    assert caught.value.where == f"{legacy}:2 [agent] workers"


def test_real_default_paths_are_the_reference_agents() -> None:
    expected = (Path("/etc/tlshd.conf"), Path("/etc/tlshd/config"))

    assert expected == config.DEFAULT_PATHS


def test_version_and_usage_errors_follow_ktls_utils(capsys: pytest.CaptureFixture[str]) -> None:
    # ktls-utils src/tlshd/main.c: -v prints "tlshd, built from ktls-utils X" on stderr and
    # exits 0; an unknown option prints the usage and returns EXIT_FAILURE (1).
    from tlshd.cli import main

    with pytest.raises(SystemExit) as done:
        main(["-v"])
    assert done.value.code == 0
    err = capsys.readouterr().err
    assert err.startswith("tlshd, built from tlshd ") and "OpenSSL" in err and "pyOpenSSL" in err
    with pytest.raises(SystemExit) as done:
        main(["--no-such-option"])
    assert done.value.code == 1
