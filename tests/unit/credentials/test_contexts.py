"""Credentials follow the files on disk (issue: "fresh credentials without a reload").

ktls-utils reads the certificate, key, CRL and trust store again for each handshake
(src/tlshd/client.c, server.c: tlshd_config_get_* per request), so a renewed certificate takes
effect at once. Here a stat per file decides; nothing is parsed unless a file changed, and a
changed file that cannot be used keeps the credentials in use.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
from cryptography import x509
from OpenSSL import SSL

from tests.pki import PKI
from tlshd.config import Config, X509Side
from tlshd.credentials.contexts import Contexts, CredentialSlot
from tlshd.credentials.files import file_state
from tlshd.errors import CredentialError
from tlshd.netlink.messages import AcceptReply, Header
from tlshd.netlink.spec import AuthMode, MsgType


def _reply(message_type: MsgType) -> AcceptReply:
    return AcceptReply(Header(0, 0, 1, 0), 3, message_type, AuthMode.X509, "localhost", None,
                       None, (), None, ())


def _served(ctx: SSL.Context) -> x509.Certificate:
    cert = SSL.Connection(ctx).get_certificate()
    assert cert is not None
    return cert.to_cryptography()


@pytest.fixture
def server_files(pki: PKI, tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    shutil.copy(pki.server.cert, cert)
    shutil.copy(pki.server.key, key)
    return cert, key


def _replace(src: Path, dst: Path) -> None:
    """Install a new file the way certbot and most tools do: write aside, rename over."""
    tmp = dst.with_suffix(".new")
    shutil.copy(src, tmp)
    os.replace(tmp, dst)


def test_renewed_certificate_is_used_by_the_next_handshake(pki, server_files):
    cert, key = server_files
    contexts = Contexts.from_config(Config(server=X509Side(certificate=cert, private_key=key)))
    first = contexts(_reply(MsgType.SERVERHELLO))
    assert _served(first) == pki.server.issued.cert
    assert contexts(_reply(MsgType.SERVERHELLO)) is first  # unchanged files: no rebuild

    _replace(pki.server_rsa.cert, cert)
    _replace(pki.server_rsa.key, key)
    renewed = contexts(_reply(MsgType.SERVERHELLO))
    assert renewed is not first and _served(renewed) == pki.server_rsa.issued.cert
    assert contexts.server is not None and contexts.server.builds == 2


def test_file_rewritten_in_place_is_noticed(pki, server_files):
    cert, key = server_files
    slot = Contexts.from_config(Config(server=X509Side(certificate=cert, private_key=key))).server
    assert slot is not None
    before = file_state(cert)
    cert.write_bytes(pki.server_rsa.cert.read_bytes())
    key.write_bytes(pki.server_rsa.key.read_bytes())
    assert file_state(cert) != before
    assert _served(slot.get()) == pki.server_rsa.issued.cert


def test_half_written_renewal_keeps_the_old_credentials_and_says_why(pki, server_files, caplog):
    cert, key = server_files
    contexts = Contexts.from_config(Config(server=X509Side(certificate=cert, private_key=key)))
    first = contexts(_reply(MsgType.SERVERHELLO))

    _replace(pki.server_rsa.cert, cert)  # the new certificate is there, its key not yet
    with caplog.at_level(logging.WARNING, logger="tlshd"):
        assert contexts(_reply(MsgType.SERVERHELLO)) is first
        assert contexts(_reply(MsgType.SERVERHELLO)) is first
    warnings = [r.getMessage() for r in caplog.records if "keeping the loaded" in r.getMessage()]
    assert len(warnings) == 1 and "does not match" in warnings[0]  # once per change
    assert contexts.problems() and "does not match" in contexts.problems()[0]

    _replace(pki.server_rsa.key, key)  # the key arrives: the pair is used, the problem gone
    assert _served(contexts(_reply(MsgType.SERVERHELLO))) == pki.server_rsa.issued.cert
    assert contexts.problems() == []


def test_deleted_file_keeps_the_loaded_credentials(pki, server_files):
    cert, key = server_files
    contexts = Contexts.from_config(Config(server=X509Side(certificate=cert, private_key=key)))
    first = contexts(_reply(MsgType.SERVERHELLO))
    key.unlink()
    assert contexts(_reply(MsgType.SERVERHELLO)) is first
    assert "cannot read private key" in contexts.problems()[0]


def test_missing_at_start_is_not_fatal_and_is_picked_up_when_it_appears(pki, tmp_path):
    cert, key = tmp_path / "later.crt", tmp_path / "later.key"
    contexts = Contexts.from_config(Config(server=X509Side(certificate=cert, private_key=key)))
    assert "cannot read certificate" in contexts.problems()[0]
    with pytest.raises(CredentialError, match=r"later\.crt"):
        contexts(_reply(MsgType.SERVERHELLO))
    shutil.copy(pki.server.cert, cert)
    shutil.copy(pki.server.key, key)
    assert _served(contexts(_reply(MsgType.SERVERHELLO))) == pki.server.issued.cert


def test_refreshed_crl_is_read_again(pki, tmp_path):
    from tests.unit.credentials.test_crl import write_crl

    crl = write_crl(tmp_path / "server.crl", pki.ca_issued, revoked=[])
    side = X509Side(truststore=pki.ca, certificate=pki.server.cert, private_key=pki.server.key,
                    crl=crl)
    slot = Contexts.from_config(Config(server=side)).server
    assert slot is not None and slot.builds == 1
    slot.get()
    assert slot.builds == 1
    write_crl(tmp_path / "server.crl", pki.ca_issued, revoked=[pki.client.issued.cert])
    slot.get()
    assert slot.builds == 2


def test_slot_repr_holds_no_key_material(pki):
    slot = CredentialSlot("server", (pki.server.key,), lambda: SSL.Context(SSL.TLS_METHOD))
    assert repr(slot) == "CredentialSlot('server', loaded=True)"


def test_loose_key_modes_get_ktls_utils_notices_and_still_load(pki, server_files, caplog):
    # ktls-utils src/tlshd/config.c, tlshd_config_read_datum: "File %s: expected mode %o"
    from tlshd.credentials.contexts import file_notices

    cert, key = server_files
    cert.chmod(0o644)
    key.chmod(0o644)  # readable by all: a notice, as in the reference, not a refusal
    side = X509Side(certificate=cert, private_key=key)
    assert file_notices(side) == [f"File {key}: expected mode 600"]
    with caplog.at_level(logging.INFO, logger="tlshd"):
        contexts = Contexts.from_config(Config(server=side))
    assert contexts.problems() == []
    assert f"File {key}: expected mode 600" in caplog.messages
    key.chmod(0o600)
    assert file_notices(side) == []
