"""What a tag filter looks at in a certificate, computed once per certificate.

The values are the strings ktls-utils 1.4.0 compares (src/tlshd/tags.c, with GnuTLS), so that
the same pattern matches the same certificate here:

* ``signatureAlgorithm``: GnuTLS's name (``RSA-SHA256``, ``ECDSA-SHA384``, ``RSA-PSS-SHA256``,
  ``EdDSA-Ed25519``), else the dotted OID;
* ``version``: 1-based decimal (``3`` for a v3 certificate);
* ``serialNumber``: the DER INTEGER's content bytes in lower-case hex (a leading ``00`` when the
  top bit is set);
* ``issuer`` / ``subject``: RFC 4514, most specific RDN first, joined by ``,`` (GnuTLS's
  ``get_dn3``), ``emailAddress`` as ``EMAIL``;
* validity as POSIX times, keyUsage as a set of bit names (None: no extension), and the SHA-1
  and SHA-256 fingerprints of the DER in lower-case hex.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID

_SIGNATURE_NAMES = {
    SignatureAlgorithmOID.RSA_WITH_SHA1: "RSA-SHA1",
    SignatureAlgorithmOID.RSA_WITH_SHA224: "RSA-SHA224",
    SignatureAlgorithmOID.RSA_WITH_SHA256: "RSA-SHA256",
    SignatureAlgorithmOID.RSA_WITH_SHA384: "RSA-SHA384",
    SignatureAlgorithmOID.RSA_WITH_SHA512: "RSA-SHA512",
    SignatureAlgorithmOID.ECDSA_WITH_SHA1: "ECDSA-SHA1",
    SignatureAlgorithmOID.ECDSA_WITH_SHA224: "ECDSA-SHA224",
    SignatureAlgorithmOID.ECDSA_WITH_SHA256: "ECDSA-SHA256",
    SignatureAlgorithmOID.ECDSA_WITH_SHA384: "ECDSA-SHA384",
    SignatureAlgorithmOID.ECDSA_WITH_SHA512: "ECDSA-SHA512",
    SignatureAlgorithmOID.ED25519: "EdDSA-Ed25519",
    SignatureAlgorithmOID.ED448: "EdDSA-Ed448",
}
_KEY_USAGE_BITS = (
    ("digitalSignature", "digital_signature"), ("nonRepudiation", "content_commitment"),
    ("keyEncipherment", "key_encipherment"), ("dataEncipherment", "data_encipherment"),
    ("keyAgreement", "key_agreement"), ("keyCertSign", "key_cert_sign"),
    ("cRLSign", "crl_sign"), ("encipherOnly", "encipher_only"),
    ("decipherOnly", "decipher_only"),
)
KEY_USAGE_NAMES = frozenset(name for name, _ in _KEY_USAGE_BITS)
_DN_NAMES = {NameOID.EMAIL_ADDRESS: "EMAIL"}


@dataclass(frozen=True)
class CertFacts:
    signature_algorithm: str
    version: str
    serial: str
    issuer: str
    subject: str
    not_before: float
    not_after: float
    key_usage: frozenset[str] | None
    sha1: str
    sha256: str


def facts_of(der: bytes) -> CertFacts | None:
    """The facts of a DER certificate, or None if it does not parse (then no filter matches,
    as with a peer that sent no certificate)."""
    try:
        cert = x509.load_der_x509_certificate(der)
        return CertFacts(
            signature_algorithm=_signature_name(cert),
            version=str(cert.version.value + 1),
            serial=_serial_hex(cert.serial_number),
            issuer=cert.issuer.rfc4514_string(_DN_NAMES),
            subject=cert.subject.rfc4514_string(_DN_NAMES),
            not_before=cert.not_valid_before_utc.timestamp(),
            not_after=cert.not_valid_after_utc.timestamp(),
            key_usage=_key_usage(cert),
            sha1=cert.fingerprint(hashes.SHA1()).hex(),  # a name to match, not a check
            sha256=cert.fingerprint(hashes.SHA256()).hex(),
        )
    except (ValueError, TypeError, x509.InvalidVersion):
        return None


def _signature_name(cert: x509.Certificate) -> str:
    oid = cert.signature_algorithm_oid
    if oid == SignatureAlgorithmOID.RSASSA_PSS:
        try:
            digest = cert.signature_hash_algorithm
        except UnsupportedAlgorithm:
            digest = None
        return f"RSA-PSS-{digest.name.upper()}" if digest else oid.dotted_string
    return _SIGNATURE_NAMES.get(oid, oid.dotted_string)


def _serial_hex(serial: int) -> str:
    """The DER INTEGER's content: minimal two's complement (serials are positive)."""
    return serial.to_bytes(serial.bit_length() // 8 + 1, "big").hex()


def _key_usage(cert: x509.Certificate) -> frozenset[str] | None:
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return None
    bits = set()
    for name, attribute in _KEY_USAGE_BITS:
        try:
            if getattr(usage, attribute):
                bits.add(name)
        except ValueError:  # encipher_only/decipher_only are undefined without keyAgreement
            pass
    return frozenset(bits)
