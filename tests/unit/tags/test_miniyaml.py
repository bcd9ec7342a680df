"""The YAML subset of tag files, against PyYAML's BaseLoader (every scalar a string, as
libyaml's events give them to ktls-utils) where the system Python has it."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tests.unit.tags.test_rules import REFERENCE_EXAMPLE
from tlshd.tags import miniyaml
from tlshd.tags.miniyaml import Map, Node, Scalar, Seq

DOCUMENTS = [
    REFERENCE_EXAMPLE,  # ktls-utils 1.4.0 etc/tlshd/tags.example
    # flow style, comments, quotes, a sequence at its key's indentation, several documents
    """# a comment
filters:
  self: {type: x509.derived.selfSigned}   # trailing comment
  v3:   {type: x509.tbs.version, pattern: 3}
  when: {type: x509.tbs.validity.notAfter, pattern: '2030-01-01 00:00:00'}
tags:
  pinned-v3:
    filter:
    - v3
    - 'not self'
  everyone: {}
  quoted: {filter: ["it's", 'a ''b'' # c', "tab\\there"]}
---
tags:
  later: {filter: [v3,
                   "not self"]}
...
""",
    "filters: {}\ntags: {}\n",
    "key: value with # no comment\nother: 'x: y'\nempty:\n",
    "list:\n  - a\n  - - nested\n    - more\n  - k: v\n    k2: v2\n",
]


def plain(node: Node) -> object:
    if isinstance(node, Scalar):
        return node.value
    if isinstance(node, Seq):
        return [plain(i) for i in node.items]
    return {k.value: plain(v) for k, v in node.pairs}


def pyyaml(text: str) -> object:
    python = shutil.which("python3")
    script = ("import json, sys, yaml; print(json.dumps(list(yaml.load_all(sys.stdin.read(), "
              "Loader=yaml.BaseLoader))))")
    done = subprocess.run([python or "python3", "-c", script], input=text, text=True,
                          capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"no PyYAML to compare with: {done.stderr.strip()[-200:]}")
    return [d for d in json.loads(done.stdout) if d is not None]


@pytest.mark.parametrize("text", DOCUMENTS)
def test_documents_read_as_pyyaml_base_loader_reads_them(text: str) -> None:
    ours = [plain(d) for d in miniyaml.parse(text)]
    assert ours == pyyaml(text)


def test_every_scalar_stays_a_string_with_its_line() -> None:
    (doc,) = miniyaml.parse("a: 3\nb: true\nc:\n  - 2025-01-01 00:00:00\n")
    assert isinstance(doc, Map)
    assert [(k.value, k.line) for k, _ in doc.pairs] == [("a", 1), ("b", 2), ("c", 3)]
    assert plain(doc) == {"a": "3", "b": "true", "c": ["2025-01-01 00:00:00"]}


def test_a_repeated_key_is_kept_for_the_schema_to_judge() -> None:
    (doc,) = miniyaml.parse("a: 1\na: 2\n")
    assert isinstance(doc, Map)
    assert [v.value for _, v in doc.pairs if isinstance(v, Scalar)] == ["1", "2"]


def test_comments_only_is_no_document() -> None:
    assert miniyaml.parse("# nothing\n\n") == []


@pytest.mark.parametrize(("text", "line", "words"), [
    ("a: &x 1\nb: *x\n", 1, "anchors"),
    ("a: 1\nb: *x\n", 2, "aliases"),
    ("a: !!str 1\n", 1, "YAML tags"),
    ("a: |\n  text\n", 1, "block scalars"),
    ("a: \"open\n", 1, "does not end"),
    ("a:\n\tb: 1\n", 2, "tab"),
    ("a: b: c\n", 1, "mapping value"),
    ("a: [1, 2\n", 1, "does not end"),
    ("a: plain\n  continued\n", 2, "several lines"),
    ("a: 1\n  b: 2\n", 2, "several lines"),
    ("a:\n  b: 1\n c: 2\n", 3, "indentation"),
    ('a: "\\q"\n', 1, "unknown escape"),
])
def test_what_tag_files_do_not_use_is_refused_with_its_line(text: str, line: int,
                                                           words: str) -> None:
    with pytest.raises(miniyaml.YAMLError) as info:
        miniyaml.parse(text)
    assert info.value.line == line
    assert words in str(info.value)
