"""Session tags: the ``tags.d`` files of ktls-utils 1.4.0, read and matched as it does.

A file holds ``filters`` (a test on one field of the peer's certificate) and ``tags`` (a name
that a session gets when every filter it lists matches and no filter it lists as ``not NAME``
does). On a successful server handshake with a certificate, the agent sends the names of the
matching tags in DONE, where the kernel declares the attribute. What follows the reference
(src/tlshd/tags.c and tls-session-tags(7) at ktls-utils-1.4.0, c63c04b2de99):

* files: every ``*.yml`` and ``*.yaml`` in the directory, not recursive, read at start and on
  each reload; a directory that cannot be read gives no tags (the reference exits at start;
  a dead service at boot is worse, and ``tlshd doctor`` says so);
* a problem in a file stops that file: what it defined before the problem stays, the other
  files are read (as the reference; the load still succeeds). A YAML syntax error takes
  nothing from its file: a half-read tag could be broader than the one written;
* names are 1 to 255 of ``[A-Za-z0-9_-]``; a filter or tag name defined twice in the whole
  load is an error; a tag may only name a filter defined before it (in that file, or in a
  file read earlier). Files are read in sorted order (the reference: directory order, which
  no one controls; sorted makes a cross-file reference predictable);
* patterns are whole-string, case-sensitive globs with ``*`` and ``?`` only, at most 16;
* the time filters take ``YYYY-MM-DD HH:MM:SS`` in local time, and compare as the reference's
  code does (notBefore: the certificate became valid at or before the time; notAfter: it is
  still valid at the time), which is the reverse of what its man page says;
* keyUsage needs every listed bit; a certificate without the extension does not match;
* with no certificate every filter is false, so a tag of only ``not`` items (or none) matches.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from tlshd.config import TAGS_DIR
from tlshd.tags import miniyaml
from tlshd.tags.miniyaml import (
    Map,
    Node,
    Scalar,
    SchemaError,
    Seq,
    expect_mapping,
    expect_scalar,
)
from tlshd.tags.x509 import KEY_USAGE_NAMES, CertFacts, facts_of

log = logging.getLogger("tlshd")

SUFFIXES = (".yml", ".yaml")
MAX_NAME = 255
MAX_WILDCARDS = 16
MAX_DONE_TAGS = 64  # HANDSHAKE_MAX_SESSIONTAGS of the posted kernel series
MAX_FILE_BYTES = 1 << 20
_NAME = re.compile(r"[A-Za-z0-9_-]+")
_TIME = re.compile(r"\s*(\d{1,4})-(\d{1,2})-(\d{1,2})\s+(\d{1,2}):(\d{1,2}):(\d{1,2})")
NEGATION = "not "


def _pattern_test(field_of: Callable[[CertFacts], str]
                  ) -> Callable[[Filter, CertFacts], bool]:
    return lambda f, facts: bool(f.glob is not None and f.glob.fullmatch(field_of(facts)))


def _fingerprint(f: Filter, facts: CertFacts) -> bool:
    return f.glob is not None and bool(f.glob.fullmatch(facts.sha1)
                                       or f.glob.fullmatch(facts.sha256))


def _not_before(f: Filter, facts: CertFacts) -> bool:
    return f.threshold is not None and f.threshold >= facts.not_before


def _not_after(f: Filter, facts: CertFacts) -> bool:
    return f.threshold is not None and f.threshold <= facts.not_after


def _key_usage(f: Filter, facts: CertFacts) -> bool:
    return facts.key_usage is not None and f.purpose <= facts.key_usage


def _self_signed(f: Filter, facts: CertFacts) -> bool:
    return facts.issuer == facts.subject


# type -> (what it needs: "pattern" | "time" | "purpose" | "", the test)
FILTER_TYPES: Mapping[str, tuple[str, Callable[[Filter, CertFacts], bool]]] = {
    "x509.cert.signatureAlgorithm": ("pattern", _pattern_test(lambda c: c.signature_algorithm)),
    "x509.tbs.version": ("pattern", _pattern_test(lambda c: c.version)),
    "x509.tbs.serialNumber": ("pattern", _pattern_test(lambda c: c.serial)),
    "x509.tbs.issuer": ("pattern", _pattern_test(lambda c: c.issuer)),
    "x509.tbs.subject": ("pattern", _pattern_test(lambda c: c.subject)),
    "x509.tbs.validity.notBefore": ("time", _not_before),
    "x509.tbs.validity.notAfter": ("time", _not_after),
    "x509.extension.keyUsage": ("purpose", _key_usage),
    "x509.derived.fingerprint": ("pattern", _fingerprint),
    "x509.derived.selfSigned": ("", _self_signed),
}


@dataclass(frozen=True)
class Filter:
    name: str
    type: str
    file: str
    line: int
    pattern: str | None = None
    purpose: frozenset[str] = frozenset()
    glob: re.Pattern[str] | None = field(default=None, compare=False)
    threshold: float | None = None

    def matches(self, facts: CertFacts | None) -> bool:
        return facts is not None and FILTER_TYPES[self.type][1](self, facts)


@dataclass(frozen=True)
class Tag:
    name: str
    items: tuple[tuple[bool, str], ...]  # (negated, filter name)
    file: str
    line: int

    def matches(self, filters: Mapping[str, Filter], facts: CertFacts | None) -> bool:
        return all(filters[name].matches(facts) != negated for negated, name in self.items)


@dataclass(frozen=True)
class TagSet:
    """One load of the directory: what is in force until the next reload."""

    directory: Path
    filters: Mapping[str, Filter] = field(default_factory=dict)
    tags: Mapping[str, Tag] = field(default_factory=dict)
    files: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()  # each stopped a file, or the directory could not be read
    warnings: tuple[str, ...] = ()  # accepted as the reference accepts them

    def __bool__(self) -> bool:
        return bool(self.tags)

    def assign(self, der: bytes | None) -> tuple[str, ...]:
        """The tags a session with this peer certificate gets, sorted, at most 64."""
        if not self.tags:
            return ()
        facts = facts_of(der) if der else None
        return tuple(sorted(name for name, tag in self.tags.items()
                            if tag.matches(self.filters, facts)))[:MAX_DONE_TAGS]

    def explain(self, der: bytes | None) -> list[tuple[Tag, bool, list[tuple[bool, str, bool]]]]:
        """Per tag: whether it matches, and per item (negated, filter, filter matched)."""
        facts = facts_of(der) if der else None
        out = []
        for name in sorted(self.tags):
            tag = self.tags[name]
            items = [(negated, f, self.filters[f].matches(facts)) for negated, f in tag.items]
            out.append((tag, all(m != n for n, _, m in items), items))
        return out


TagFileError = SchemaError  # a problem in a tag file, with its line


def yaml_files(directory: Path) -> tuple[list[str], str | None]:
    """The ``*.yml`` and ``*.yaml`` files of a directory, sorted; a missing directory has
    none, an unreadable one a problem (tags.d, policy.d)."""
    try:
        return sorted(p.name for p in directory.iterdir()
                      if p.name.endswith(SUFFIXES) and p.is_file()), None
    except FileNotFoundError:
        return [], None
    except OSError as exc:
        return [], f"{directory}: {exc.strerror or exc}"


def load_tags(directory: Path = TAGS_DIR) -> TagSet:
    """Read every tag file in ``directory``; never raises (problems are in the result)."""
    names, problem = yaml_files(directory)
    if problem:
        return TagSet(directory, problems=(problem,))
    loader = _Loader(directory)
    for name in names:
        loader.read_file(directory / name)
    return loader.result()


def parse_tag_texts(texts: Iterable[tuple[str, str]], directory: Path = TAGS_DIR) -> TagSet:
    """As ``load_tags``, from (file name, text) pairs in reading order (tests, doctor)."""
    loader = _Loader(directory)
    for name, text in texts:
        loader.read_text(name, text)
    return loader.result()


class _Loader:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.filters: dict[str, Filter] = {}
        self.tags: dict[str, Tag] = {}
        self.files: list[str] = []
        self.problems: list[str] = []
        self.warnings: list[str] = []

    def result(self) -> TagSet:
        return TagSet(self.directory, dict(self.filters), dict(self.tags), tuple(self.files),
                      tuple(self.problems), tuple(self.warnings))

    def read_file(self, path: Path) -> None:
        try:
            with path.open("rb") as handle:
                data = handle.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            self.problems.append(f"{path}: {exc.strerror or exc}")
            return
        if len(data) > MAX_FILE_BYTES:
            self.problems.append(f"{path}: larger than {MAX_FILE_BYTES} bytes; not read")
            return
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            self.problems.append(f"{path}: not UTF-8 (byte {exc.start}); not read")
            return
        self.read_text(path.name, text)

    def read_text(self, name: str, text: str) -> None:
        self.files.append(name)
        try:
            documents = miniyaml.parse(text)
        except miniyaml.YAMLError as exc:
            self.problems.append(f"{name}:{exc.line}: {exc.reason}; nothing in this file is used")
            return
        try:
            for document in documents:
                self._document(name, document)
        except TagFileError as exc:
            self.problems.append(f"{name}:{exc.line}: {exc}; the rest of this file is skipped")

    def _document(self, file: str, node: Node) -> None:
        if not isinstance(node, Map):
            raise TagFileError("a document must be a mapping of 'filters' and 'tags'", node.line)
        for key, value in node.pairs:
            if key.value == "filters":
                for name, body in expect_mapping(value, "filters").pairs:
                    self._filter(file, name, body)
            elif key.value == "tags":
                for name, body in expect_mapping(value, "tags").pairs:
                    self._tag(file, name, body)
            else:
                raise TagFileError(f"unexpected key {_show(key.value)} (expected 'filters' or "
                                   "'tags')", key.line)

    def _filter(self, file: str, name: Scalar, body: Node) -> None:
        _check_name(name)
        fields: dict[str, Node] = {}
        for key, value in expect_mapping(body, f"filter {name.value}").pairs:
            if key.value == "type" and "type" in fields:
                raise TagFileError(f"filter {name.value}: type set twice", key.line)
            if key.value not in ("type", "pattern", "purpose"):
                raise TagFileError(f"filter {name.value}: unexpected key {_show(key.value)}",
                                   key.line)
            fields[key.value] = value  # a repeated pattern: the last one, as the reference
        made = self._build_filter(file, name, fields)
        previous = self.filters.get(made.name)
        if previous is not None:
            raise TagFileError(f"filter {made.name} is already defined in {previous.file}",
                               name.line)
        self.filters[made.name] = made

    def _build_filter(self, file: str, name: Scalar, fields: dict[str, Node]) -> Filter:
        kind = expect_scalar(fields["type"], "type").value if "type" in fields else None
        if kind is None:
            raise TagFileError(f"filter {name.value} has no type", name.line)
        if kind not in FILTER_TYPES:
            raise TagFileError(f"filter {name.value}: type {_show(kind)} is not supported "
                               f"(one of {', '.join(FILTER_TYPES)})", fields["type"].line)
        needs = FILTER_TYPES[kind][0]
        pattern = expect_scalar(fields["pattern"], "pattern") if "pattern" in fields else None
        if pattern is not None:
            _check_wildcards(name.value, pattern)
        purpose = self._purpose(name, fields.get("purpose"))
        for extra, present in (("pattern", pattern is not None), ("purpose", bool(purpose))):
            if present and needs != extra and not (extra == "pattern" and needs == "time"):
                self.warnings.append(f"{file}:{name.line}: filter {name.value}: {extra} is "
                                     f"extraneous for {kind}; ignored")
        made = Filter(name.value, kind, file, name.line)
        if needs in ("pattern", "time"):
            if pattern is None:
                raise TagFileError(f"filter {name.value} ({kind}) is missing a pattern",
                                   name.line)
            if needs == "time":
                return replace(made, pattern=pattern.value, threshold=_local_time(name, pattern))
            return replace(made, pattern=pattern.value, glob=compile_glob(pattern.value))
        if needs == "purpose":
            if not purpose:
                raise TagFileError(f"filter {name.value} ({kind}) needs a purpose list of one "
                                   "or more key usage bits", name.line)
            return replace(made, purpose=purpose)
        return made

    def _purpose(self, name: Scalar, node: Node | None) -> frozenset[str]:
        if node is None:
            return frozenset()
        if not isinstance(node, Seq):
            raise TagFileError(f"filter {name.value}: purpose must be a list", node.line)
        bits = set()
        for item in node.items:
            bit = expect_scalar(item, "a purpose").value
            if bit not in KEY_USAGE_NAMES:
                raise TagFileError(f"filter {name.value}: unknown key usage {_show(bit)} (one "
                                   f"of {', '.join(sorted(KEY_USAGE_NAMES))})", item.line)
            bits.add(bit)
        return frozenset(bits)

    def _tag(self, file: str, name: Scalar, body: Node) -> None:
        _check_name(name)
        items: list[tuple[bool, str]] = []
        for key, value in expect_mapping(body, f"tag {name.value}").pairs:
            if key.value != "filter":
                raise TagFileError(f"tag {name.value}: unexpected key {_show(key.value)} "
                                   "(only 'filter')", key.line)
            if not isinstance(value, Seq):
                raise TagFileError(f"tag {name.value}: filter must be a list", value.line)
            for item in value.items:
                items.append(self._reference(name.value, expect_scalar(item, "a filter reference")))
        if name.value in self.tags:
            raise TagFileError(f"tag {name.value} is already defined in "
                               f"{self.tags[name.value].file}", name.line)
        self.tags[name.value] = Tag(name.value, tuple(items), file, name.line)

    def _reference(self, tag: str, item: Scalar) -> tuple[bool, str]:
        negated = item.value.startswith(NEGATION)
        target = Scalar(item.value[len(NEGATION):] if negated else item.value, item.line)
        _check_name(target)
        if target.value not in self.filters:
            raise TagFileError(f"tag {tag} names filter {target.value}, which is not defined "
                               "(yet: a filter must come before the tags that use it)",
                               item.line)
        return negated, target.value


def _show(value: str) -> str:
    return repr(value[:40] + ("..." if len(value) > 40 else ""))


def _check_name(name: Scalar) -> None:
    size = len(name.value.encode())
    if not 1 <= size <= MAX_NAME:
        raise TagFileError(f"a name of {size} bytes (1 to {MAX_NAME})", name.line)
    if not _NAME.fullmatch(name.value):
        raise TagFileError(f"name {_show(name.value)}: only letters, digits, '_' and '-'",
                           name.line)


def _check_wildcards(name: str, pattern: Scalar) -> None:
    count = pattern.value.count("*") + pattern.value.count("?")
    if count > MAX_WILDCARDS:
        raise TagFileError(f"filter {name}: {count} wildcards in the pattern (at most "
                           f"{MAX_WILDCARDS})", pattern.line)


def compile_glob(pattern: str) -> re.Pattern[str]:
    """A whole-string glob: ``*`` any run, ``?`` one character, everything else literal."""
    parts = (".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile("".join(parts), re.DOTALL)


def _local_time(name: Scalar, pattern: Scalar) -> float:
    match = _TIME.match(pattern.value)
    if match is None:
        raise TagFileError(f"filter {name.value}: time {_show(pattern.value)} is not "
                           "'YYYY-MM-DD HH:MM:SS'", pattern.line)
    year, month, day, hour, minute, second = (int(g) for g in match.groups())
    try:
        return time.mktime((year, month, day, hour, minute, second, 0, 0, 0))
    except (OverflowError, ValueError):
        raise TagFileError(f"filter {name.value}: time {_show(pattern.value)} is out of range",
                           pattern.line) from None
