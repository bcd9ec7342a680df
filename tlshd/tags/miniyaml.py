"""The part of YAML that session-tag files use, parsed without a YAML library.

ktls-utils reads ``/etc/tlshd/tags.d/*.yml`` with libyaml's event parser and takes every
scalar as a string (tls-session-tags(7)). This module reads the same files the same way:
block and flow mappings and sequences, plain, single- and double-quoted scalars, comments and
several documents (``---``). Every scalar stays a string: ``3``, ``true`` and dates are text, as
in the reference, and a repeated key is kept (the schema decides what it means).

What tag files have no use for is refused with the line it is on, never guessed at: anchors
and aliases (the reference refuses aliases too), tags (``!``), block scalars (``|``, ``>``),
scalars over several lines, complex keys and tabs in indentation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


class YAMLError(ValueError):
    """A syntax error, or YAML that tag files do not use; ``line`` counts from 1."""

    def __init__(self, message: str, line: int) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line
        self.reason = message


@dataclass(frozen=True)
class Scalar:
    value: str
    line: int


@dataclass(frozen=True)
class Seq:
    items: tuple[Node, ...]
    line: int


@dataclass(frozen=True)
class Map:
    pairs: tuple[tuple[Scalar, Node], ...]
    line: int


Node = Scalar | Seq | Map


class _Line(NamedTuple):
    number: int
    indent: int
    text: str  # without indentation or comment


_REFUSED_STARTS = {"&": "anchors", "*": "aliases", "!": "YAML tags", "|": "block scalars",
                   ">": "block scalars", "?": "complex keys", "@": "reserved characters",
                   "`": "reserved characters", "%": "directives inside a document"}
_ESCAPES = {"0": "\0", "a": "\a", "b": "\b", "t": "\t", "\t": "\t", "n": "\n", "v": "\v",
            "f": "\f", "r": "\r", "e": "\x1b", " ": " ", '"': '"', "/": "/", "\\": "\\",
            "N": "\x85", "_": "\xa0"}
_HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}


def parse(text: str) -> list[Node]:
    """The documents of ``text``; an empty document (comments only) yields none."""
    documents: list[list[_Line]] = [[]]
    for number, raw in enumerate(text.splitlines(), start=1):
        if raw.startswith("%") and not documents[-1]:
            continue  # a directive (%YAML, %TAG) before a document's content
        body = _strip_comment(raw, number)
        stripped = body.strip()
        if stripped == "---" or raw.startswith("--- "):
            documents.append([])
            rest = body[3:].strip()
            if rest:
                documents[-1].append(_Line(number, 4, rest))
            continue
        if stripped == "...":
            documents.append([])
            continue
        if not stripped:
            continue
        indent = len(body) - len(body.lstrip(" "))
        if body[indent] == "\t":
            raise YAMLError("a tab in indentation", number)
        documents[-1].append(_Line(number, indent, body.strip()))
    return [_Parser(lines).document() for lines in documents if lines]


def _strip_comment(raw: str, number: int) -> str:
    quote = ""
    i = 0
    while i < len(raw):
        char = raw[i]
        if quote:
            if char == "\\" and quote == '"':
                i += 1  # the escaped character cannot end the scalar
            elif char == quote == "'" and raw[i + 1:i + 2] == "'":
                i += 1  # '' is a quote inside a single-quoted scalar
            elif char == quote:
                quote = ""
        elif char in "\"'" and (i == 0 or raw[i - 1] in " \t[{,:-"):
            quote = char
        elif char == "#" and (i == 0 or raw[i - 1] in " \t"):
            return raw[:i].rstrip()
        i += 1
    if quote:
        raise YAMLError("a quoted scalar that does not end on its line", number)
    return raw.rstrip()


class _Parser:
    def __init__(self, lines: list[_Line]) -> None:
        self.lines = lines
        self.i = 0

    def document(self) -> Node:
        node = self.block(self.lines[0].indent)
        if self.i < len(self.lines):
            raise YAMLError("content after the document's top-level node",
                            self.lines[self.i].number)
        return node

    def block(self, indent: int) -> Node:
        line = self.lines[self.i]
        if line.indent < indent:
            return Scalar("", line.number)
        if _is_entry(line.text):
            return self.sequence(line.indent)
        if _key_split(line.text, line.number) is not None:
            return self.mapping(line.indent)
        self.i += 1
        return self.inline(line.text, line.number, line.indent)

    def mapping(self, indent: int) -> Map:
        pairs: list[tuple[Scalar, Node]] = []
        first = self.lines[self.i].number
        while self.i < len(self.lines) and self.lines[self.i].indent == indent:
            line = self.lines[self.i]
            split = _key_split(line.text, line.number)
            if split is None or _is_entry(line.text):
                raise YAMLError("expected 'key: value' in a mapping", line.number)
            key_text, rest = split
            key = _scalar(key_text, line.number)
            self.i += 1
            if rest:
                value = self.inline(rest, line.number, indent)
            else:
                value = self.nested(indent, line.number, entries_at_same_indent=True)
            pairs.append((key, value))
        self._check_dedent(indent)
        return Map(tuple(pairs), first)

    def sequence(self, indent: int) -> Seq:
        items: list[Node] = []
        first = self.lines[self.i].number
        while (self.i < len(self.lines) and self.lines[self.i].indent == indent
               and _is_entry(self.lines[self.i].text)):
            line = self.lines[self.i]
            rest = line.text[1:].lstrip(" ")
            if not rest:
                self.i += 1
                items.append(self.nested(indent, line.number, entries_at_same_indent=False))
            elif _is_entry(rest) or _key_split(rest, line.number) is not None:
                # "- key: value" or "- - x": the rest starts a block at its own column
                offset = indent + len(line.text) - len(rest)
                self.lines[self.i] = _Line(line.number, offset, rest)
                items.append(self.block(offset))
            else:
                self.i += 1
                items.append(self.inline(rest, line.number, indent))
        self._check_dedent(indent)
        return Seq(tuple(items), first)

    def nested(self, indent: int, number: int, *, entries_at_same_indent: bool) -> Node:
        """The block under a key or an entry that ends its line, or an empty scalar."""
        if self.i < len(self.lines):
            following = self.lines[self.i]
            if following.indent > indent or (entries_at_same_indent
                                             and following.indent == indent
                                             and _is_entry(following.text)):
                return self.block(following.indent)
        return Scalar("", number)

    def _check_dedent(self, indent: int) -> None:
        if self.i < len(self.lines) and self.lines[self.i].indent > indent:
            raise YAMLError("unexpected indentation", self.lines[self.i].number)

    def inline(self, text: str, number: int, indent: int) -> Node:
        if text[0] in "[{":
            while _unbalanced(text) and self.i < len(self.lines) and \
                    self.lines[self.i].indent > indent:
                text += " " + self.lines[self.i].text  # a flow collection over several lines
                self.i += 1
            node, end = _flow(text, 0, number)
            if text[end:].strip():
                raise YAMLError(f"unexpected {text[end:].strip()[:20]!r} after a flow collection",
                                number)
            return node
        scalar = _scalar(text, number)
        if self.i < len(self.lines) and self.lines[self.i].indent > indent and \
                not _is_entry(self.lines[self.i].text):
            raise YAMLError("a scalar over several lines", self.lines[self.i].number)
        return scalar


def _is_entry(text: str) -> bool:
    return text == "-" or text.startswith("- ")


def _key_split(text: str, number: int) -> tuple[str, str] | None:
    """``key: rest`` (outside quotes), else None."""
    if text[0] in "[{":
        return None
    if text[0] in "\"'":
        end = _quoted_end(text, 0, number)
        after = text[end:].lstrip(" ")
        if after == ":" or after.startswith(": "):
            return text[:end], after[1:].strip()
        return None
    for i, char in enumerate(text):
        if char == ":" and (i + 1 == len(text) or text[i + 1] == " "):
            return text[:i].rstrip(), text[i + 1:].strip()
    return None


def _scalar(text: str, number: int) -> Scalar:
    if text[0] in "\"'":
        end = _quoted_end(text, 0, number)
        if text[end:].strip():
            raise YAMLError(f"unexpected {text[end:].strip()[:20]!r} after a quoted scalar",
                            number)
        return Scalar(_unquote(text[:end], number), number)
    _refuse(text, number)
    if ": " in text or text.endswith(":"):
        raise YAMLError("a mapping value is not allowed here", number)
    return Scalar(text, number)


def _refuse(text: str, number: int) -> None:
    what = _REFUSED_STARTS.get(text[0])
    if what is not None:
        raise YAMLError(f"{what} are not supported in tag files", number)


def _quoted_end(text: str, start: int, number: int) -> int:
    quote = text[start]
    i = start + 1
    while i < len(text):
        if quote == '"' and text[i] == "\\":
            i += 2
            continue
        if text[i] == quote:
            if quote == "'" and text[i + 1:i + 2] == "'":
                i += 2
                continue
            return i + 1
        i += 1
    raise YAMLError("a quoted scalar that does not end", number)


def _unquote(token: str, number: int) -> str:
    body = token[1:-1]
    if token[0] == "'":
        return body.replace("''", "'")
    out: list[str] = []
    i = 0
    while i < len(body):
        char = body[i]
        if char != "\\":
            out.append(char)
            i += 1
            continue
        code = body[i + 1:i + 2]
        if code in _ESCAPES:
            out.append(_ESCAPES[code])
            i += 2
        elif code in _HEX_ESCAPES:
            digits = body[i + 2:i + 2 + _HEX_ESCAPES[code]]
            try:
                out.append(chr(int(digits, 16)))
            except ValueError:
                raise YAMLError(f"a bad \\{code} escape", number) from None
            i += 2 + len(digits)
        else:
            raise YAMLError(f"an unknown escape \\{code}", number)
    return "".join(out)


def _unbalanced(text: str) -> bool:
    depth, quote = 0, ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
    return depth > 0


def _flow(text: str, pos: int, number: int) -> tuple[Node, int]:
    pos = _skip(text, pos)
    if pos >= len(text):
        raise YAMLError("a flow collection that does not end", number)
    opener = text[pos]
    if opener == "[":
        return _flow_sequence(text, pos + 1, number)
    if opener == "{":
        return _flow_mapping(text, pos + 1, number)
    if opener in "\"'":
        end = _quoted_end(text, pos, number)
        return Scalar(_unquote(text[pos:end], number), number), end
    end = pos
    while end < len(text) and text[end] not in ",]}" and not (
            text[end] == ":" and (end + 1 == len(text) or text[end + 1] in " ,]}")):
        end += 1
    plain = text[pos:end].strip()
    if plain:
        _refuse(plain, number)
    return Scalar(plain, number), end


def _flow_sequence(text: str, pos: int, number: int) -> tuple[Seq, int]:
    items: list[Node] = []
    while True:
        pos = _skip(text, pos)
        if pos < len(text) and text[pos] == "]":
            return Seq(tuple(items), number), pos + 1
        node, pos = _flow(text, pos, number)
        items.append(node)
        pos = _separator(text, pos, "]", number)
        if text[pos - 1] == "]":
            return Seq(tuple(items), number), pos


def _flow_mapping(text: str, pos: int, number: int) -> tuple[Map, int]:
    pairs: list[tuple[Scalar, Node]] = []
    while True:
        pos = _skip(text, pos)
        if pos < len(text) and text[pos] == "}":
            return Map(tuple(pairs), number), pos + 1
        key, pos = _flow(text, pos, number)
        if not isinstance(key, Scalar):
            raise YAMLError("complex keys are not supported in tag files", number)
        pos = _skip(text, pos)
        value: Node = Scalar("", number)
        if pos < len(text) and text[pos] == ":":
            value, pos = _flow(text, pos + 1, number)
        pairs.append((key, value))
        pos = _separator(text, pos, "}", number)
        if text[pos - 1] == "}":
            return Map(tuple(pairs), number), pos


def _separator(text: str, pos: int, closer: str, number: int) -> int:
    pos = _skip(text, pos)
    if pos >= len(text):
        raise YAMLError("a flow collection that does not end", number)
    if text[pos] in ("," + closer):
        return pos + 1
    raise YAMLError(f"expected ',' or {closer!r} in a flow collection", number)


def _skip(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] == " ":
        pos += 1
    return pos


class SchemaError(ValueError):
    """Well-formed YAML of the wrong shape for its file (tag files, policy files)."""

    def __init__(self, message: str, line: int) -> None:
        super().__init__(message)
        self.line = line


def expect_mapping(node: Node, what: str) -> Map:
    if not isinstance(node, Map):
        raise SchemaError(f"{what}: expected a mapping", node.line)
    return node


def expect_scalar(node: Node, what: str) -> Scalar:
    if not isinstance(node, Scalar):
        raise SchemaError(f"{what}: expected a single value", node.line)
    return node
