"""tlshd.credentials.trust: the one reading of the trust-store and CRL rules, which the agent
and doctor share."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.pki import PKI
from tlshd import doctor
from tlshd.credentials import trust
from tlshd.errors import CredentialError


def test_openssl_s_variables_come_before_the_distribution_s_bundle(tmp_path: Path) -> None:
    assert trust.system_store({"SSL_CERT_FILE": "/x/ca.pem"}).bundle == Path("/x/ca.pem")
    store = trust.system_store({"SSL_CERT_DIR": "/x/certs:/y"})
    assert (store.bundle, store.directory, store.source) == (None, Path("/x/certs"),
                                                             "$SSL_CERT_DIR")


def test_without_the_variables_the_distribution_s_bundle_is_the_store() -> None:
    if not any(Path(b).is_file() for b in trust.SYSTEM_CA_BUNDLES):
        with pytest.raises(CredentialError, match="no system CA bundle"):
            trust.system_store({})
        return
    store = trust.system_store({})
    assert store.bundle is not None and str(store.bundle) in trust.SYSTEM_CA_BUNDLES


def test_doctor_reports_the_store_the_agent_loads(pki: PKI, monkeypatch: pytest.MonkeyPatch
                                                   ) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
    anchors, verdicts = doctor.load_trust_store("client", None)
    assert anchors is not None and len(anchors) == 1
    assert str(pki.ca) in verdicts[0].detail and "$SSL_CERT_FILE" in verdicts[0].detail


def test_a_hashed_directory_counts_only_its_hash_named_entries(pki: PKI, tmp_path: Path) -> None:
    (tmp_path / "README").write_text("not a certificate")
    with pytest.raises(CredentialError, match=r"no <subject hash>\.0 entries"):
        trust.anchors(tmp_path)
    assert len(trust.anchors(pki.ca_dir)) == 1


def test_a_crl_file_that_is_not_one_is_named(tmp_path: Path) -> None:
    path = tmp_path / "crl.pem"
    path.write_bytes(b"-----BEGIN X509 CRL-----\nnot base64\n-----END X509 CRL-----\n")
    with pytest.raises(CredentialError, match=r"not a PEM or DER X\.509 CRL"):
        trust.read_crls(path)
    with pytest.raises(CredentialError, match="cannot read CRL"):
        trust.read_crls(tmp_path / "absent.pem")
