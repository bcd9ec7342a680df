"""``tlshd tags CERT...``: which session tags a certificate would get, and why.

For each certificate (PEM, several in a file: the first is the leaf, as a peer sends it; or
DER) it prints the fields the filters look at, every tag with each of its items (a filter,
``not`` a filter, and whether that filter matched), and the tags DONE would carry for a
server handshake whose client presented it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TextIO

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tlshd.tags.rules import TagSet
from tlshd.tags.x509 import facts_of
from tlshd.untrusted import show


def leaf_der(data: bytes) -> bytes:
    """The first certificate of a PEM file, or the DER itself; ValueError if neither."""
    if b"-----BEGIN" in data:
        return x509.load_pem_x509_certificate(data).public_bytes(serialization.Encoding.DER)
    x509.load_der_x509_certificate(data)
    return data


def explain(tags: TagSet, paths: list[Path], out: TextIO) -> int:
    """Print the explanation for each file; 1 if a file could not be read as a certificate."""
    out.write(f"session tags from {tags.directory}: {len(tags.tags)} tag(s), "
              f"{len(tags.filters)} filter(s) in {len(tags.files)} file(s)\n")
    for problem in tags.problems:
        out.write(f"  problem: {problem}\n")
    code = 0
    for path in paths:
        try:
            der = leaf_der(path.read_bytes())
        except (OSError, ValueError) as exc:
            out.write(f"{path}: not a certificate ({show(str(exc), 120)})\n")
            code = 1
            continue
        _one(tags, path, der, out)
    return code


def _one(tags: TagSet, path: Path, der: bytes, out: TextIO) -> None:
    facts = facts_of(der)
    out.write(f"\n{path}\n")
    if facts is not None:
        usage = ", ".join(sorted(facts.key_usage)) if facts.key_usage is not None else "(none)"
        out.write(f"  subject: {facts.subject}\n  issuer:  {facts.issuer}\n"
                  f"  signature: {facts.signature_algorithm}, version {facts.version}, "
                  f"serial {facts.serial}\n  sha256: {facts.sha256}\n  keyUsage: {usage}\n")
    for tag, matched, items in tags.explain(der):
        out.write(f"  {'+' if matched else '-'} {tag.name} ({tag.file}:{tag.line})\n")
        for negated, name, hit in items:
            verdict = "matches" if hit else "does not match"
            want = "ok" if hit != negated else "FAILS"
            out.write(f"      {'not ' if negated else ''}{name}: {verdict} -> {want}\n")
        if not items:
            out.write("      (no filters: every session)\n")
    assigned = tags.assign(der)
    out.write(f"  tags: {', '.join(assigned) if assigned else '(none)'}\n")
