"""``[app.credentials.NAME]`` and the policy's ``credentials:`` action: parsed leniently
(a bad group is warned about and skipped; a rule naming it is then refused), each a client
and a server slot with its client_auth, and carried to the handshake process."""

from __future__ import annotations

from pathlib import Path

import pytest
from OpenSSL import SSL

from tests.pki import PKI
from tlshd.agent.privsep import decode_reply, encode_reply
from tlshd.config import parse_config
from tlshd.credentials.contexts import Contexts
from tlshd.errors import CredentialError
from tlshd.netlink.messages import AcceptReply, Header
from tlshd.netlink.spec import AuthMode, MsgType
from tlshd.policy import parse_policy_texts


def _reply(profile: str, role: MsgType = MsgType.CLIENTHELLO) -> AcceptReply:
    return AcceptReply(header=Header(0, 0, 1, 42), sockfd=-1, message_type=role,
                       auth_mode=AuthMode.X509, peername=None, timeout_ms=None, keyring=None,
                       peer_identities=(), certificate=None, unknown_attrs=(),
                       profile=profile)


def test_credential_groups_parse_with_client_auth_and_bad_ones_are_skipped() -> None:
    config = parse_config(
        "[app.credentials.web]\nx509.certificate=/c.pem\nx509.private_key=/k.pem\n"
        "x509.truststore=/ca.pem\nclient_auth=required\n\n"
        "[app.credentials.trust-only]\nx509.truststore=/ca.pem\nbogus=1\n\n"
        "[app.credentials.bad name]\nx509.truststore=/x\n\n"
        "[app.credentials.odd]\nclient_auth=sometimes\n")
    assert sorted(config.app_credentials) == ["trust-only", "web"]
    web = config.app_credentials["web"]
    assert (web.side.certificate, web.side.private_key, web.client_auth) == (
        Path("/c.pem"), Path("/k.pem"), "required")
    assert config.app_credentials["trust-only"].client_auth == "optional"
    warnings = "\n".join(config.warnings)
    assert "[app.credentials.trust-only] bogus: unknown key" in warnings
    assert "a name of 1 to 64 letters" in warnings
    assert "[app.credentials.odd] client_auth: one of none, optional, required" in warnings


def test_a_rule_names_credentials() -> None:
    policy = parse_policy_texts([("a.yml", "rules:\n  r:\n    action: {credentials: web}\n"
                                  "  s:\n    action: {credentials: 'no such/name'}\n")],
                                Path("/p"))
    assert policy.problems and "credentials: NAME" in policy.problems[0]
    ok = parse_policy_texts([("a.yml", "rules:\n  r:\n    action: {credentials: web}\n")],
                            Path("/p"))
    assert ok.rules[0].credentials == "web"


def test_each_profile_has_its_slots_and_client_auth_sets_the_servers_verify_mode(
        pki: PKI) -> None:
    text = (f"[authenticate.client]\nx509.truststore={pki.ca}\n\n"
            + "".join(f"[app.credentials.{auth}]\nx509.certificate={pki.server.cert}\n"
                      f"x509.private_key={pki.server.key}\nx509.truststore={pki.ca}\n"
                      f"client_auth={auth}\n\n" for auth in ("none", "optional", "required"))
            + f"[app.credentials.trust]\nx509.truststore={pki.ca}\n")
    contexts = Contexts.from_config(parse_config(text))
    modes = {auth: contexts(_reply(auth, MsgType.SERVERHELLO)).get_verify_mode()
             for auth in ("none", "optional", "required")}
    assert modes == {"none": SSL.VERIFY_NONE, "optional": SSL.VERIFY_PEER,
                     "required": SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT}
    assert contexts(_reply("trust")) is not contexts(_reply(""))  # its own trust store
    assert ("trust", "server") not in contexts.app  # no certificate: no server
    with pytest.raises(CredentialError, match="has no certificate for a server"):
        contexts(_reply("trust", MsgType.SERVERHELLO))


def test_the_profile_crosses_to_the_handshake_process() -> None:
    reply = _reply("web")
    assert decode_reply(encode_reply(reply), 7).profile == "web"
    legacy = encode_reply(_reply(""))
    del legacy["profile"]
    assert decode_reply(legacy, 7).profile == ""
