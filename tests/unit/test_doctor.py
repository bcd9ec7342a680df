"""tlshd doctor: the verdict rules, the credential checks on real files, the report.

Credentials come from tests/pki.py (written to disk, checked as the agent would
load them); certificates with other lifetimes or names are issued here. Host
probes (netlink, sockets, /proc, keyrings) are the sim tier's business
(tests/sim/test_doctor.py); here their verdict functions get the values.
"""

from __future__ import annotations

import datetime
import errno
import io
import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.pki import PKI, Issued, PEMFiles, issue_leaf, make_ca, make_key, write_issued, write_pki
from tlshd import doctor
from tlshd.config import Config, X509Side, parse_config
from tlshd.doctor import Level, Verdict

NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return write_pki(tmp_path_factory.mktemp("pki"))


def side(files: PEMFiles | None, truststore: Path | None, crl: Path | None = None) -> X509Side:
    return X509Side(truststore=truststore, crl=crl, certificate=files.cert if files else None,
                    private_key=files.key if files else None)


def healthy(pki: PKI) -> Config:
    return Config(client=side(pki.client, pki.ca), server=side(pki.server, pki.ca_dir))


def by_check(verdicts: list[Verdict], check: str) -> list[Verdict]:
    return [v for v in verdicts if v.check == check]


def only(verdicts: list[Verdict], check: str) -> Verdict:
    (found,) = by_check(verdicts, check)
    return found


def failures(verdicts: list[Verdict]) -> list[Verdict]:
    return [v for v in verdicts if v.level is Level.FAIL]


def leaf(ca: Issued, *, days: float = 365, start_days: float = -1, dns: tuple[str, ...] = (),
         ips: tuple[str, ...] = ()) -> Issued:
    """A server leaf of ``ca`` valid from ``start_days`` to ``days`` from now."""
    key = make_key()
    san: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    san += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    builder = (x509.CertificateBuilder().subject_name(
        x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "doctor.test")]))
        .issuer_name(ca.cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW + start_days * DAY).not_valid_after(NOW + days * DAY))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def intermediate(root: Issued) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "inter")]))
            .issuer_name(root.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - DAY).not_valid_after(NOW + 365 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(root.key, hashes.SHA256()))
    return Issued(cert, key)


def crl_of(ca: Issued, *, next_update: datetime.datetime,
           revoked: int = 0) -> x509.CertificateRevocationList:
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject)
               .last_update(NOW - 2 * DAY).next_update(next_update))
    for serial in range(1, revoked + 1):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(NOW - DAY)
            .build())
    return builder.sign(ca.key, hashes.SHA256())


# --- 1. configuration ------------------------------------------------------------------


def test_config_that_loads_is_ok_and_unknown_keys_warn_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "tlshd.conf"
    path.write_text("[debug]\nloglevel=1\n\n[agent]\nworkerz=2\n")

    verdicts, config = doctor.check_config(path)

    assert config is not None
    assert verdicts[0] == Verdict(Level.OK, "config", f"{path} loaded")
    assert verdicts[1].level is Level.WARN
    assert f"{path}:5: [agent] workerz: unknown key" in verdicts[1].detail


def test_config_syntax_error_fails_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "tlshd.conf"
    path.write_text("[debug]\nloglevel=1\nthis is not a key file line\n")

    verdicts, config = doctor.check_config(path)

    assert config is None
    (verdict,) = verdicts
    assert verdict.level is Level.FAIL
    assert verdict.detail.startswith(f"{path}:3: expected 'key=value'")
    assert verdict.fix is not None and "correct that line" in verdict.fix


def test_bad_value_fails_naming_file_line_group_and_key(tmp_path: Path) -> None:
    path = tmp_path / "tlshd.conf"
    path.write_text("[agent]\nworkers=many\n")

    (verdict,), _ = doctor.check_config(path)

    assert verdict.level is Level.FAIL
    assert f"{path}:2 [agent] workers" in verdict.detail


def test_missing_config_file_fails_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "absent.conf"

    (verdict,), config = doctor.check_config(path)

    assert config is None
    assert verdict.level is Level.FAIL
    assert str(path) in verdict.detail
    assert verdict.fix == "name a readable file with -c FILE"


# --- 2./3./4. verdicts from what the probes saw ---------------------------------------------


def test_missing_handshake_family_fails_with_the_kernel_config_fix() -> None:
    verdict = doctor.netlink_verdict(errno.ENOENT, "resolve family: ENOENT (2)")

    assert verdict.level is Level.FAIL
    assert "no 'handshake' generic netlink family" in verdict.detail
    assert verdict.fix == "kernel needs CONFIG_NET_HANDSHAKE (Linux 6.4+)"


def test_netlink_that_cannot_be_used_at_all_fails_with_the_reason() -> None:
    verdict = doctor.netlink_verdict(None, "[Errno 97] Address family not supported by protocol")

    assert verdict.level is Level.FAIL
    assert "Address family not supported" in verdict.detail


def test_tls_ulp_missing_fails_in_netlink_mode_with_modprobe_fix() -> None:
    verdict = doctor.ulp_verdict(errno.ENOENT, simulated=False)

    assert doctor.format_verdict(verdict) == [
        'FAIL  tls ULP: setsockopt(TCP_ULP, "tls") -> ENOENT: the tls module is not loaded',
        "      fix: modprobe tls (CONFIG_TLS=m)",
    ]


def test_tls_ulp_missing_is_only_a_warning_under_kernel_sim() -> None:
    verdict = doctor.ulp_verdict(errno.ENOENT, simulated=True)

    assert verdict.level is Level.WARN
    assert "kernel-sim provides its own record layer" in verdict.detail


def test_tls_ulp_that_loads_is_ok() -> None:
    assert doctor.ulp_verdict(0, simulated=False).level is Level.OK


def test_tls_ulp_other_errno_names_it() -> None:
    verdict = doctor.ulp_verdict(errno.ENOTCONN, simulated=False)

    assert verdict.level is Level.FAIL
    assert "ENOTCONN" in verdict.detail


@pytest.mark.parametrize(("cap_eff", "inode", "level", "words"), [
    (1 << 12, doctor.PROC_USER_INIT_INO, Level.OK, "initial user namespace"),
    (0x1FFFFFFFFFF & ~(1 << 12), doctor.PROC_USER_INIT_INO, Level.FAIL, "not in the effective"),
    (1 << 12, 4026532000, Level.FAIL, "not the initial one"),
    (1 << 12, None, Level.WARN, "cannot read /proc/self/ns/user"),
    (None, None, Level.WARN, "cannot read CapEff"),
])
def test_cap_net_admin_must_be_effective_in_the_initial_user_namespace(
        cap_eff: int | None, inode: int | None, level: Level, words: str) -> None:
    verdict = doctor.privilege_verdict(cap_eff, inode)

    assert verdict.check == "CAP_NET_ADMIN"
    assert verdict.level is level
    assert words in verdict.detail


# --- 5. keyrings -----------------------------------------------------------------------------


def test_kernel_keyrings_are_ok_present_or_absent_with_what_they_serve() -> None:
    assert doctor.kernel_keyring_verdict(".nvme", 1234).level is Level.OK
    absent = doctor.kernel_keyring_verdict(".nvme", None)
    assert absent.level is Level.OK
    assert "only needed for NVMe/TCP" in absent.detail


def test_configured_keyring_missing_or_unsearchable_fails() -> None:
    missing = doctor.configured_keyring_verdict("site", None, None)
    denied = doctor.configured_keyring_verdict("site", 77, errno.EACCES)
    usable = doctor.configured_keyring_verdict("site", 77, None)

    assert missing.level is Level.FAIL and "not found" in missing.detail
    assert denied.level is Level.FAIL and "EACCES" in denied.detail
    assert usable == Verdict(Level.OK, "keyring site", "serial 77, searchable")


# --- 6. credentials ----------------------------------------------------------------------------


def test_healthy_credentials_have_no_failure(pki: PKI) -> None:
    verdicts = doctor.check_credentials(healthy(pki), NOW)

    assert failures(verdicts) == []
    for check in ("client trust store", "server trust store", "client certificate",
                  "server certificate", "client chain", "server chain", "server names",
                  "TLS contexts"):
        assert only(verdicts, check).level is Level.OK, check
    assert "hashed directory" in only(verdicts, "server trust store").detail


def test_server_names_lists_dns_and_ip_sans(pki: PKI) -> None:
    verdict = only(doctor.check_credentials(healthy(pki), NOW), "server names")

    assert verdict.detail == "peers may connect as DNS server.test, localhost; IP 127.0.0.1, ::1"


def test_expired_certificate_fails_with_expired(pki: PKI) -> None:
    config = Config(server=side(pki.expired_server, pki.ca))

    verdicts = doctor.check_credentials(config, NOW)

    (failure,) = failures(verdicts)
    assert failure.check == "server expiry"
    assert "expired" in failure.detail
    assert only(verdicts, "server chain").level is Level.OK  # expiry is said once


def test_not_yet_valid_certificate_fails() -> None:
    cert = leaf(make_ca(), start_days=2, days=30).cert

    verdict = doctor.validity_verdict("client", cert, NOW)

    assert verdict.level is Level.FAIL
    assert "not yet valid" in verdict.detail


def test_certificate_expiring_in_ten_days_warns(tmp_path: Path, pki: PKI) -> None:
    files = write_issued(tmp_path, "soon", leaf(pki.ca_issued, days=10, dns=("soon.test",)))

    verdicts = doctor.check_credentials(Config(server=side(files, pki.ca)), NOW)

    verdict = only(verdicts, "server expiry")
    assert verdict.level is Level.WARN
    assert "expires in 9 days" in verdict.detail
    assert failures(verdicts) == []


def test_certificate_valid_for_a_year_is_ok() -> None:
    verdict = doctor.validity_verdict("server", leaf(make_ca(), days=365).cert, NOW)

    assert verdict.level is Level.OK
    assert "(364 days)" in verdict.detail


def test_key_not_matching_the_certificate_fails(pki: PKI) -> None:
    config = Config(server=X509Side(truststore=pki.ca, certificate=pki.server.cert,
                                    private_key=pki.client.key))

    (failure,) = failures(doctor.check_credentials(config, NOW))

    assert failure.check == "server certificate"
    assert "private key does not match the certificate" in failure.detail


def test_chain_from_an_untrusted_ca_fails(pki: PKI) -> None:
    config = Config(server=side(pki.untrusted_server, pki.ca))

    (failure,) = failures(doctor.check_credentials(config, NOW))

    assert failure.check == "server chain"
    assert "untrusted test CA" in failure.detail
    assert failure.fix is not None and "x509.truststore" in failure.fix


def test_chain_is_checked_against_every_configured_trust_store(pki: PKI) -> None:
    """The server's own store only verifies clients; the site CA in the client section counts."""
    config = Config(client=side(None, pki.ca), server=side(pki.server, pki.untrusted_ca))

    verdicts = doctor.check_credentials(config, NOW)

    assert only(verdicts, "server chain").level is Level.OK


def test_without_a_configured_store_an_unchained_certificate_only_warns(
        pki: PKI, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
    config = Config(server=side(pki.untrusted_server, None))

    verdicts = doctor.check_credentials(config, NOW)

    assert f"the system store, {pki.ca} ($SSL_CERT_FILE): 1 certificate" in only(
        verdicts, "server trust store").detail
    assert only(verdicts, "server chain").level is Level.WARN


def test_chain_from_an_ed25519_ca_is_ok(tmp_path: Path) -> None:
    """OpenSSL (the agent, its peers) accepts what the Web PKI profile would refuse."""
    ca = make_ca("ed25519 CA", kind="ed25519")
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem())
    files = write_issued(tmp_path, "srv", issue_leaf(ca, "srv.test", dns=("srv.test",)))

    verdicts = doctor.check_credentials(Config(server=side(files, tmp_path / "ca.pem")), NOW)

    assert only(verdicts, "server chain").level is Level.OK


def test_intermediates_after_the_leaf_complete_the_chain(tmp_path: Path, pki: PKI) -> None:
    inter = intermediate(pki.ca_issued)
    issued = leaf(inter, dns=("deep.test",))
    files = write_issued(tmp_path, "deep", issued)
    chain_file = tmp_path / "deep-chain.crt"
    chain_file.write_bytes(issued.cert_pem() + inter.cert_pem())
    with_chain = Config(server=X509Side(truststore=pki.ca, certificate=chain_file,
                                       private_key=files.key))

    assert failures(doctor.check_credentials(with_chain, NOW)) == []
    (failure,) = failures(doctor.check_credentials(Config(server=side(files, pki.ca)), NOW))
    assert failure.check == "server chain"


def test_missing_certificate_file_fails_naming_the_file(tmp_path: Path, pki: PKI) -> None:
    absent = tmp_path / "absent.crt"
    config = Config(client=X509Side(truststore=pki.ca, certificate=absent,
                                    private_key=pki.client.key))

    (failure,) = failures(doctor.check_credentials(config, NOW))

    assert failure.check == "client certificate"
    assert str(absent) in failure.detail
    assert "No such file" in failure.detail


def test_certificate_without_its_key_fails(pki: PKI) -> None:
    config = Config(client=X509Side(truststore=pki.ca, certificate=pki.client.cert))

    (failure,) = failures(doctor.check_credentials(config, NOW))

    assert "must be set together" in failure.detail


def test_certificate_for_the_wrong_purpose_fails(pki: PKI) -> None:
    config = Config(server=side(pki.client, pki.ca))  # a clientAuth-only certificate

    (failure,) = failures(doctor.check_credentials(config, NOW))

    assert failure.check == "server certificate"
    assert "lacks serverAuth" in failure.detail


def test_server_certificate_without_sans_warns(tmp_path: Path, pki: PKI) -> None:
    files = write_issued(tmp_path, "nosan", issue_leaf(pki.ca_issued, "nosan.test"))

    verdicts = doctor.check_credentials(Config(server=side(files, pki.ca)), NOW)

    verdict = only(verdicts, "server names")
    assert verdict.level is Level.WARN
    assert "no DNS or IP subjectAltName" in verdict.detail
    assert failures(verdicts) == []


def test_no_server_certificate_warns_about_the_nfs_server(pki: PKI) -> None:
    verdict = only(doctor.check_credentials(Config(), NOW), "server certificate")

    assert verdict.level is Level.WARN
    assert "tls_server_hello_x509 without serials" in verdict.detail
    assert "[authenticate.server] x509.certificate" in verdict.detail


def test_no_client_certificate_is_fine(pki: PKI) -> None:
    assert only(doctor.check_credentials(Config(), NOW), "client certificate").level is Level.OK


def test_missing_trust_store_fails_naming_it(tmp_path: Path, pki: PKI) -> None:
    absent = tmp_path / "absent-ca.pem"
    config = Config(client=side(pki.client, absent))

    verdicts = doctor.check_credentials(config, NOW)

    failure = only(verdicts, "client trust store")
    assert failure.level is Level.FAIL
    assert str(absent) in failure.detail
    assert by_check(verdicts, "client chain") == []  # nothing to check it against


def test_trust_store_without_certificates_fails(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pem"
    empty.write_text("not a certificate\n")
    unhashed = tmp_path / "unhashed"
    unhashed.mkdir()
    (unhashed / "ca.pem").write_text("copied, never rehashed\n")

    for store in (empty, unhashed):
        (verdict,) = doctor.load_trust_store("client", store)[1]
        assert verdict.level is Level.FAIL, store
        assert verdict.fix is not None and "openssl rehash" in verdict.fix
    assert "<subject hash>.0" in doctor.load_trust_store("client", unhashed)[1][0].detail


def test_current_crl_is_ok_and_an_expired_one_fails(tmp_path: Path, pki: PKI) -> None:
    current, stale = tmp_path / "current.crl", tmp_path / "stale.crl"
    pem = serialization.Encoding.PEM
    fresh = crl_of(pki.ca_issued, next_update=NOW + 7 * DAY, revoked=2)
    current.write_bytes(fresh.public_bytes(pem))
    stale.write_bytes(crl_of(pki.ca_issued, next_update=NOW - DAY).public_bytes(pem))

    (ok,) = doctor.check_crl("server", current, NOW)
    (expired,) = doctor.check_crl("server", stale, NOW)

    assert ok.level is Level.OK and "2 revoked certificates" in ok.detail
    assert expired.level is Level.FAIL
    assert "CRL has expired" in expired.detail


def test_several_pem_crls_and_a_der_crl_are_read(tmp_path: Path, pki: PKI) -> None:
    other = make_ca("second CA")
    pem, der = tmp_path / "two.crl", tmp_path / "one.der"
    pem.write_bytes(b"".join(crl_of(ca, next_update=NOW + DAY).public_bytes(
        serialization.Encoding.PEM) for ca in (pki.ca_issued, other)))
    der.write_bytes(crl_of(other, next_update=NOW + DAY).public_bytes(serialization.Encoding.DER))

    assert [v.level for v in doctor.check_crl("client", pem, NOW)] == [Level.OK, Level.OK]
    assert "second CA" in doctor.check_crl("client", der, NOW)[0].detail


def test_unreadable_or_malformed_crl_fails(tmp_path: Path, pki: PKI) -> None:
    junk = tmp_path / "junk.crl"
    junk.write_text("junk")
    config = Config(server=side(pki.server, pki.ca, crl=tmp_path / "absent.crl"))

    assert doctor.check_crl("client", junk, NOW)[0].level is Level.FAIL
    failure = only(doctor.check_credentials(config, NOW), "server CRL")
    assert failure.level is Level.FAIL and "absent.crl" in failure.detail


# --- formatting and exit status -------------------------------------------------------------


def test_verdict_lines_have_the_level_column_and_an_indented_fix() -> None:
    verdict = Verdict(Level.WARN, "server expiry", "expires in 9 days", "renew it")

    assert doctor.format_verdict(verdict) == ["WARN  server expiry: expires in 9 days",
                                              "      fix: renew it"]
    assert doctor.format_verdict(Verdict(Level.OK, "config", "a\n  b")) == ["OK    config: a b"]


def test_summary_counts_and_says_whether_tlshd_will_work() -> None:
    fail = Verdict(Level.FAIL, "a", "x")
    warn = Verdict(Level.WARN, "b", "y")
    ok = Verdict(Level.OK, "c", "z")

    assert doctor.format_summary([ok, warn, ok]) == "0 failures, 1 warning, 2 ok: healthy"
    assert doctor.format_summary([fail, fail, warn, warn]) == (
        "2 failures, 2 warnings, 0 ok: tlshd will not work until the failures are fixed")
    assert doctor.format_report([ok])[-2:] == ["", doctor.format_summary([ok])]


def test_exit_status_is_one_only_when_something_failed() -> None:
    assert doctor.exit_status([]) == 0
    assert doctor.exit_status([Verdict(Level.OK, "a", "x"), Verdict(Level.WARN, "b", "y")]) == 0
    assert doctor.exit_status([Verdict(Level.OK, "a", "x"), Verdict(Level.FAIL, "b", "y")]) == 1


@pytest.mark.parametrize(("verdicts", "status"), [
    ([Verdict(Level.OK, "a", "x"), Verdict(Level.WARN, "b", "y", "z")], 0),
    ([Verdict(Level.FAIL, "a", "x", "do this")], 1),
])
def test_run_doctor_prints_the_report_and_returns_the_status(
        monkeypatch: pytest.MonkeyPatch, verdicts: list[Verdict], status: int) -> None:
    seen: list[tuple[Path | None, str | None]] = []

    def fake_collect(path: Path | None, upcall: str | None) -> list[Verdict]:
        seen.append((path, upcall))
        return verdicts

    monkeypatch.setattr(doctor, "collect", fake_collect)
    out = io.StringIO()

    assert doctor.run_doctor(Path("/etc/x"), "netlink", out) == status
    assert seen == [(Path("/etc/x"), "netlink")]
    assert out.getvalue().splitlines() == doctor.format_report(verdicts)


# --- secrets -------------------------------------------------------------------------------


def _secret_fragments(files: PEMFiles) -> Iterator[str]:
    """Every base64 line of the key's PEM, and 16-byte windows of its DER and scalar in hex."""
    for line in files.key.read_text().splitlines():
        if line and not line.startswith("-----"):
            yield line
    der_hex = files.key_der.hex()
    yield from (der_hex[i:i + 32] for i in range(0, len(der_hex) - 32, 8))
    key = files.issued.key
    if isinstance(key, ec.EllipticCurvePrivateKey):
        value = key.private_numbers().private_value
        yield format(value, "x")[:32]
        yield str(value)[:24]


def _mistakes(pki: PKI, tmp_path: Path) -> list[Config]:
    """Configurations that point at private keys where other files belong."""
    key = pki.server.key
    return [
        healthy(pki),
        Config(server=X509Side(truststore=pki.ca, certificate=key, private_key=key)),
        Config(server=X509Side(truststore=key, certificate=pki.server.cert,
                               private_key=pki.client.key, crl=key)),
        Config(client=X509Side(truststore=pki.ca_dir, certificate=pki.client.cert,
                               private_key=pki.server.key)),
        Config(server=side(pki.expired_server, key)),
    ]


def test_no_verdict_ever_carries_private_key_material(pki: PKI, tmp_path: Path) -> None:
    verdicts: list[Verdict] = []
    for config in _mistakes(pki, tmp_path):
        verdicts += doctor.check_credentials(config, NOW)
    verdicts += doctor.check_config(pki.server.key)[0]  # -c pointed at a key
    pasted = tmp_path / "pasted.conf"
    pasted.write_text("[authenticate.server]\n" + pki.client.key.read_text())
    verdicts += doctor.check_config(pasted)[0]
    report = "\n".join(doctor.format_report(verdicts)) + repr(verdicts)

    assert failures(verdicts)  # the mistakes were noticed...
    for files in (pki.server, pki.client, pki.expired_server):
        for fragment in _secret_fragments(files):  # ...and nothing secret was said
            assert fragment.lower() not in report.lower()
    assert "PRIVATE KEY-----\n" not in report


def test_parse_config_warning_text_is_what_the_doctor_shows(tmp_path: Path) -> None:
    config = parse_config("[agent]\nnope=1\n", tmp_path / "c")

    assert config.warnings == (f"{tmp_path / 'c'}:2: [agent] nope: unknown key, ignored",)


def test_groups_are_checked_against_this_openssl() -> None:
    from tlshd.doctor import check_groups
    from tlshd.handshake import _openssl

    assert check_groups("") == []
    if not _openssl.HAS_GROUPS:
        (only,) = check_groups("X25519")
        assert only.level is Level.WARN and "cannot set" in only.detail
        return
    (ok,) = check_groups("X25519:secp256r1")
    assert ok.level is Level.OK
    (bad,) = check_groups("nosuchgroup:alsonot")
    assert bad.level is Level.FAIL and "default list" in bad.detail
    (some,) = check_groups("X25519:nosuchgroup")
    assert some.level in (Level.WARN, Level.OK)  # OpenSSL 3.5 syntax may take it whole


def test_app_endpoint_users_must_exist_and_the_name_is_reported(tmp_path: Path) -> None:
    import socket
    import uuid

    from tlshd.config import parse_config
    from tlshd.doctor import check_app

    name = f"tlshd-test-doctor/{uuid.uuid4().hex[:8]}"
    config = parse_config(f"[app]\nenabled=true\nsocket={name}\nallow_users=root;nosuchuser;0\n")
    verdicts = check_app(config)
    assert [v.level for v in verdicts] == [Level.FAIL, Level.OK]
    assert "nosuchuser" in verdicts[0].detail and "free" in verdicts[1].detail
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as held:
        held.bind(b"\0" + name.encode())
        assert "served" in check_app(config)[-1].detail
    assert check_app(parse_config("")) == []


def test_app_policy_problems_undefined_credentials_and_bad_credential_files_fail(
        tmp_path: Path, pki: PKI) -> None:
    from tlshd.config import parse_config
    from tlshd.doctor import check_app_policy

    policy_dir = tmp_path / "policy.d"
    policy_dir.mkdir()
    (policy_dir / "a.yml").write_text(
        "rules:\n  r1:\n    action: {credentials: web}\n  r2:\n    action: {credentials: gone}\n")
    config = parse_config(
        f"[app]\npolicy_dir={policy_dir}\n\n[app.credentials.web]\n"
        f"x509.certificate={pki.server.cert}\nx509.private_key={pki.server.key}\n"
        f"x509.truststore={pki.ca}\n\n[app.credentials.broken]\n"
        f"x509.certificate={tmp_path}/none.pem\nx509.private_key={pki.server.key}\n")
    verdicts = check_app_policy(config)
    assert all(v.level is Level.FAIL for v in verdicts)
    details = "\n".join(v.detail for v in verdicts)
    assert "policy rule r2 (a.yml) names credentials gone" in details
    assert "[app.credentials.broken] as a client" in details
    assert "[app.credentials.web]" not in details
    (policy_dir / "a.yml").write_text("rules:\n  r1:\n    action: {credentials: web}\n")
    good = parse_config(f"[app]\npolicy_dir={policy_dir}\n\n[app.credentials.web]\n"
                        f"x509.truststore={pki.ca}\n")
    (ok,) = check_app_policy(good)
    assert ok.level is Level.OK and "1 rule(s) in 1 file(s)" in ok.detail
    (policy_dir / "b.yml").write_text("rules: [\n")
    assert any("policy:" in v.detail and v.level is Level.FAIL
               for v in check_app_policy(good))
