"""Session tags: the reference's examples (ktls-utils 1.4.0 etc/tlshd/tags.example and
tls-session-tags(7)), its loading rules, and the certificate fields against GnuTLS's certtool."""

from __future__ import annotations

import datetime
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import NameOID

from tlshd.tags import load_tags, parse_tag_texts
from tlshd.tags.x509 import facts_of

REFERENCE_EXAMPLE = """---
filters:
  monsters-university:
    type: "x509.tbs.issuer"
    pattern: "*,O=Monsters University,*"
  fear-tech:
    type: "x509.tbs.issuer"
    pattern: "*,O=Fear Technology Institute,*"
  school-scaring:
    type: "x509.tbs.subject"
    pattern: "*,OU=School of Scaring,*"
  school-can-design:
    type: "x509.tbs.subject"
    pattern: "*,OU=School of Scream Can Design,*"
  fraternity-ror:
    type: "x509.tbs.subject"
    pattern: "*,OU=Roar Omega Roar,*"
  valid-keyusage:
    type: "x509.extension.keyUsage"
    purpose:
      - "digitalSignature"
      - "nonRepudiation"

tags:
  ror-mu-chapter:
    filter:
      - "monsters-university"
      - "fraternity-ror"
      - "valid-keyusage"
  ror-ft-chapter:
    filter:
      - "fear-tech"
      - "fraternity-ror"
      - "valid-keyusage"
  can-design-student-materials:
    filter:
      - "school-can-design"
"""

NOW = datetime.datetime.now(datetime.UTC)
USAGE_BITS = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
              "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")


def dn(*rdns: tuple[x509.ObjectIdentifier, str]) -> x509.Name:
    """RDNs given most specific first, as RFC 4514 prints them."""
    return x509.Name([x509.RelativeDistinguishedName([x509.NameAttribute(oid, value)])
                      for oid, value in reversed(rdns)])


def cert(subject: x509.Name, issuer: x509.Name | None = None, *, usage: set[str] | None = None,
         key: object = None, serial: int = 0x1234, days: tuple[int, int] = (-1, 30),
         pss: bool = False) -> x509.Certificate:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer or subject)
               .public_key(key.public_key()).serial_number(serial)  # type: ignore[attr-defined]
               .not_valid_before(NOW + datetime.timedelta(days=days[0]))
               .not_valid_after(NOW + datetime.timedelta(days=days[1])))
    if usage is not None:
        flags = {bit: bit in usage for bit in USAGE_BITS}
        flags["encipher_only"] = flags["decipher_only"] = False
        builder = builder.add_extension(x509.KeyUsage(**flags), critical=True)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return builder.sign(key, None)
    if pss:
        return builder.sign(key, hashes.SHA384(),  # type: ignore[arg-type]
                            rsa_padding=padding.PSS(mgf=padding.MGF1(hashes.SHA384()),
                                                    salt_length=48))
    return builder.sign(key, hashes.SHA256())  # type: ignore[arg-type]


def der(c: x509.Certificate) -> bytes:
    return c.public_bytes(serialization.Encoding.DER)


MU_CA = dn((NameOID.COMMON_NAME, "MU Root CA"), (NameOID.ORGANIZATION_NAME, "Monsters University"),
           (NameOID.COUNTRY_NAME, "US"))
SULLEY = dn((NameOID.COMMON_NAME, "James P. Sullivan"),
            (NameOID.ORGANIZATIONAL_UNIT_NAME, "Roar Omega Roar"),
            (NameOID.ORGANIZATION_NAME, "Monsters University"), (NameOID.COUNTRY_NAME, "US"))


@pytest.fixture(scope="module")
def example():
    tags = parse_tag_texts([("mu.yml", REFERENCE_EXAMPLE)])
    assert tags.problems == () and tags.warnings == ()
    return tags


def test_a1_a_ror_member_of_mu_with_the_key_usages_gets_ror_mu_chapter(example) -> None:
    leaf = cert(SULLEY, MU_CA, usage={"digital_signature", "content_commitment",
                                      "key_encipherment"})
    assert example.assign(der(leaf)) == ("ror-mu-chapter",)


def test_a2_one_key_usage_short_gets_nothing(example) -> None:
    assert example.assign(der(cert(SULLEY, MU_CA, usage={"digital_signature"}))) == ()


def test_a2_no_key_usage_extension_never_matches_a_key_usage_filter(example) -> None:
    assert example.assign(der(cert(SULLEY, MU_CA))) == ()


def test_a3_a_can_design_student_of_fti_gets_its_tag_only(example) -> None:
    fti = dn((NameOID.COMMON_NAME, "FTI CA"),
             (NameOID.ORGANIZATION_NAME, "Fear Technology Institute"),
             (NameOID.COUNTRY_NAME, "US"))
    student = dn((NameOID.COMMON_NAME, "X"),
                 (NameOID.ORGANIZATIONAL_UNIT_NAME, "School of Scream Can Design"),
                 (NameOID.ORGANIZATION_NAME, "Fear Technology Institute"),
                 (NameOID.COUNTRY_NAME, "US"))
    assert example.assign(der(cert(student, fti, usage={"digital_signature",
                                                       "content_commitment"}))) == (
        "can-design-student-materials",)


def test_a4_the_glob_needs_an_rdn_after_the_organisation(example) -> None:
    last = dn((NameOID.COMMON_NAME, "CA"), (NameOID.ORGANIZATION_NAME, "Monsters University"))
    leaf = cert(SULLEY, last, usage={"digital_signature", "content_commitment"})
    assert example.assign(der(leaf)) == ()


def test_no_certificate_matches_no_filter_so_only_negations_and_empty_tags() -> None:
    tags = parse_tag_texts([("c.yml", """
filters:
  self: {type: x509.derived.selfSigned}
  v3:   {type: x509.tbs.version, pattern: 3}
tags:
  pinned-v3: {filter: [v3]}
  not-self-signed: {filter: ["not self"]}
  everyone: {}
""")])
    assert tags.assign(None) == ("everyone", "not-self-signed")
    ca_issued = cert(SULLEY, MU_CA)
    assert tags.assign(der(ca_issued)) == ("everyone", "not-self-signed", "pinned-v3")
    assert tags.assign(der(cert(SULLEY))) == ("everyone", "pinned-v3")
    assert tags.assign(b"not a certificate") == ("everyone", "not-self-signed")


def test_negation_takes_a_tag_away() -> None:
    tags = parse_tag_texts([("b.yml", """
filters:
  monsters-university: {type: x509.tbs.issuer, pattern: "*,O=Monsters University,*"}
  fear-tech: {type: x509.tbs.issuer, pattern: "*Fear Technology*"}
  fraternity-ror: {type: x509.tbs.subject, pattern: "*,OU=Roar Omega Roar,*"}
tags:
  ror-mu-chapter:
    filter:
      - monsters-university
      - not fear-tech
      - fraternity-ror
""")])
    assert tags.assign(der(cert(SULLEY, MU_CA))) == ("ror-mu-chapter",)
    both = dn((NameOID.COMMON_NAME, "Fear Technology joint CA"),
              (NameOID.ORGANIZATION_NAME, "Monsters University"), (NameOID.COUNTRY_NAME, "US"))
    assert tags.assign(der(cert(SULLEY, both))) == ()


def test_fingerprint_serial_signature_and_time_filters() -> None:
    leaf = cert(SULLEY, MU_CA, serial=0x80FF, days=(-10, 10))
    sha256 = leaf.fingerprint(hashes.SHA256()).hex()
    sha1 = leaf.fingerprint(hashes.SHA1()).hex()
    past = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(time.time() - 5 * 86400))
    future = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(time.time() + 5 * 86400))
    far = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(time.time() + 50 * 86400))
    tags = parse_tag_texts([("f.yml", f"""
filters:
  pin256: {{type: x509.derived.fingerprint, pattern: "{sha256[:6]}*"}}
  pin1: {{type: x509.derived.fingerprint, pattern: "{sha1}"}}
  upper: {{type: x509.derived.fingerprint, pattern: "{sha256.upper()}"}}
  serial: {{type: x509.tbs.serialNumber, pattern: "0080ff"}}
  ecdsa: {{type: x509.cert.signatureAlgorithm, pattern: "ECDSA-*"}}
  valid-by-past: {{type: x509.tbs.validity.notBefore, pattern: "{past}"}}
  valid-until-future: {{type: x509.tbs.validity.notAfter, pattern: "{future}"}}
  valid-until-far: {{type: x509.tbs.validity.notAfter, pattern: "{far}"}}
tags:
  t256: {{filter: [pin256]}}
  t1: {{filter: [pin1]}}
  tupper: {{filter: [upper]}}
  tserial: {{filter: [serial, ecdsa]}}
  tpast: {{filter: [valid-by-past]}}
  tfuture: {{filter: [valid-until-future]}}
  tfar: {{filter: [valid-until-far]}}
""")])
    assert tags.problems == ()
    # case-sensitive globs; notBefore: valid at or before the time; notAfter: still valid then
    assert tags.assign(der(leaf)) == ("t1", "t256", "tfuture", "tpast", "tserial")


def test_a_problem_stops_its_file_keeping_what_came_before_and_other_files() -> None:
    tags = parse_tag_texts([
        ("10-a.yml", """
filters:
  ok: {type: x509.tbs.version, pattern: "3"}
tags:
  first: {filter: [ok]}
  second: {filter: [missing]}
  third: {filter: [ok]}
"""),
        ("20-b.yml", "tags:\n  from-b: {filter: [ok]}\n"),
        ("30-bad.yml", "filters:\n  x: {type: x509.tbs.version, pattern: \"3\"\n"),
    ])
    assert sorted(tags.tags) == ["first", "from-b"]
    assert tags.files == ("10-a.yml", "20-b.yml", "30-bad.yml")
    assert len(tags.problems) == 2
    assert tags.problems[0].startswith("10-a.yml:6: tag second names filter missing")
    assert tags.problems[1].startswith("30-bad.yml:2:") and "nothing in this file" in \
        tags.problems[1]


@pytest.mark.parametrize(("text", "words"), [
    ("filters:\n  a: {type: x509.tbs.version, pattern: 1}\n  a: {type: x509.tbs.version, "
     "pattern: 2}\n", "already defined"),
    ("tags:\n  bad name: {}\n", "only letters"),
    ("tags:\n  " + "n" * 256 + ": {}\n", "256 bytes"),
    ("filters:\n  a: {type: x509.tbs.subject}\n", "missing a pattern"),
    ("filters:\n  a: {type: x509.extension.keyUsage}\n", "purpose list"),
    ("filters:\n  a: {type: x509.extension.keyUsage, purpose: [signing]}\n", "unknown key usage"),
    ("filters:\n  a: {type: x509.extension.extendedKeyUsage, pattern: x}\n", "not supported"),
    ("filters:\n  a: {pattern: x}\n", "has no type"),
    ("filters:\n  a: {type: x509.tbs.version, type: x509.tbs.subject, pattern: x}\n",
     "type set twice"),
    ("filters:\n  a: {type: x509.tbs.subject, pattern: \"" + "*" * 17 + "\"}\n", "17 wildcards"),
    ("filters:\n  a: {type: x509.tbs.validity.notAfter, pattern: tomorrow}\n", "is not"),
    ("filters:\n  a: {type: x509.tbs.subject, pattern: x, colour: red}\n", "unexpected key"),
    ("tags:\n  t:\n", "expected a mapping"),
    ("tags:\n  t: {filters: []}\n", "only 'filter'"),
    ("filters:\n  a: {type: x509.tbs.version, pattern: \"3\"}\ntags:\n  t: {filter: [NOT a]}\n",
     "only letters"),
    ("what: ever\n", "unexpected key"),
    ("- a list\n", "a document must be a mapping"),
])
def test_schema_errors_are_reported_with_file_and_line(text: str, words: str) -> None:
    tags = parse_tag_texts([("x.yml", text)])
    assert len(tags.problems) == 1
    assert tags.problems[0].startswith("x.yml:")
    assert words in tags.problems[0], tags.problems[0]


def test_extraneous_keys_warn_and_the_filter_is_kept() -> None:
    tags = parse_tag_texts([("w.yml", "filters:\n  a: {type: x509.tbs.subject, pattern: x, "
                                      "purpose: [cRLSign]}\n")])
    assert tags.problems == () and "a" in tags.filters
    assert "extraneous" in tags.warnings[0]


def test_a_tag_may_use_a_filter_of_a_file_read_before_it(tmp_path: Path) -> None:
    (tmp_path / "10-filters.yaml").write_text("filters:\n  v: {type: x509.tbs.version, "
                                              "pattern: \"3\"}\n")
    (tmp_path / "20-tags.yml").write_text("tags:\n  v3: {filter: [v]}\n")
    (tmp_path / "tags.example").write_text("not: [read]\n")  # neither suffix: never read
    (tmp_path / "sub.yml").mkdir()
    tags = load_tags(tmp_path)
    assert tags.files == ("10-filters.yaml", "20-tags.yml")
    assert tags.problems == ()
    assert tags.assign(der(cert(SULLEY, MU_CA))) == ("v3",)


def test_a_missing_directory_is_no_tags_and_no_problem(tmp_path: Path) -> None:
    tags = load_tags(tmp_path / "absent")
    assert not tags and tags.problems == ()


def test_at_most_64_tags_as_the_kernel_series_keeps() -> None:
    text = "tags:\n" + "".join(f"  t{i:03d}: {{}}\n" for i in range(70))
    assert len(parse_tag_texts([("m.yml", text)]).assign(None)) == 64


# --- the certificate's fields against GnuTLS (the reference matches what GnuTLS prints) --

def _certtool(c: x509.Certificate, tmp_path: Path) -> dict[str, str]:
    tool = shutil.which("certtool")
    if tool is None:
        pytest.skip("no certtool (gnutls-bin) to compare with")
    pem = tmp_path / "c.pem"
    pem.write_bytes(c.public_bytes(serialization.Encoding.PEM))
    out = subprocess.run([tool, "-i", "--infile", str(pem)], capture_output=True, text=True,
                         check=True).stdout
    fields = {}
    for key in ("Version", "Serial Number (hex)", "Issuer", "Subject", "Signature Algorithm"):
        match = re.search(rf"^\s*{re.escape(key)}: (.*)$", out, re.MULTILINE)
        assert match, key
        fields[key] = match.group(1)
    fields["sha1"] = re.search(r"^\s*sha1:([0-9a-f]+)$", out, re.MULTILINE).group(1)
    fields["sha256"] = re.search(r"^\s*sha256:([0-9a-f]+)$", out, re.MULTILINE).group(1)
    return fields


ODD_NAME = x509.Name([
    x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COUNTRY_NAME, "US")]),
    x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.ORGANIZATION_NAME,
                                                       "Monsters, University")]),
    x509.RelativeDistinguishedName([
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Roar Omega Roar"),
        x509.NameAttribute(NameOID.USER_ID, "sulley")]),
    x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COMMON_NAME, "James P. Sullivan")]),
    x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.EMAIL_ADDRESS, "s@mu.edu")]),
])


@pytest.mark.parametrize("kind", ["ec", "rsa", "rsa-pss", "ed25519"])
def test_fields_are_the_strings_gnutls_prints(kind: str, tmp_path: Path) -> None:
    key = {"ec": lambda: ec.generate_private_key(ec.SECP384R1()),
           "rsa": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
           "rsa-pss": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
           "ed25519": ed25519.Ed25519PrivateKey.generate}[kind]()
    c = cert(ODD_NAME, MU_CA, key=key, serial=0x80FF if kind != "ec" else 0x7F01,
             pss=kind == "rsa-pss")
    facts = facts_of(der(c))
    assert facts is not None
    gnutls = _certtool(c, tmp_path)
    assert facts.version == gnutls["Version"]
    assert facts.serial == gnutls["Serial Number (hex)"]
    assert facts.issuer == gnutls["Issuer"]
    assert facts.subject == gnutls["Subject"]
    assert facts.signature_algorithm == gnutls["Signature Algorithm"]
    assert (facts.sha1, facts.sha256) == (gnutls["sha1"], gnutls["sha256"])
