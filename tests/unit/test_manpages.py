"""The man pages: committed roff equals a fresh build from docs/*.md, and it renders cleanly.

tools/mkman.py is the converter; these tests pin its Markdown subset (so a page that
uses something it does not know fails loudly) and keep docs and man pages in step.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tlshd.config import parse_config
from tools import mkman

ROOT = Path(__file__).resolve().parents[2]


def test_committed_man_pages_equal_a_fresh_build() -> None:
    stale = [str(path.relative_to(ROOT)) for path, roff in mkman.build(ROOT).items()
             if not path.exists() or path.read_text() != roff]
    assert not stale, f"run `python tools/mkman.py` and commit: {stale} differ from docs/"


def test_check_mode_agrees(capsys: pytest.CaptureFixture[str]) -> None:
    assert mkman.main(["--check"]) == 0
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("page", sorted(mkman.PAGES.values()))
def test_pages_render_without_warnings(page: str) -> None:
    command = _renderer(ROOT / page)
    env = {**os.environ, "MANWIDTH": "80", "LC_ALL": "C.UTF-8", "MAN_KEEP_STDERR": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60,
                            check=False)
    print(" ".join(command), "->", result.returncode, result.stderr)
    assert result.returncode == 0
    assert result.stderr == ""
    assert "NAME" in result.stdout and "SEE ALSO" in result.stdout


def _renderer(page: Path) -> list[str]:
    """man -l with groff's warnings on, else groff or nroff directly; else skip."""
    if shutil.which("man") and shutil.which("groff"):
        return ["man", "--warnings=w", "-l", str(page)]
    if shutil.which("groff"):
        return ["groff", "-man", "-Tutf8", "-ww", str(page)]
    if shutil.which("nroff"):
        return ["nroff", "-man", "-ww", str(page)]
    pytest.skip("no man, groff or nroff: install man-db and groff-base to render the pages")


def test_every_config_key_is_documented() -> None:
    """Each key the parser knows appears in tlshd.conf(5), in its group's section."""
    text = (ROOT / "docs/tlshd.conf.5.md").read_text()
    sections = dict(re.findall(r"^## \[([^\]]+)\]\n(.*?)(?=^## |\Z)", text, re.M | re.S))
    from tlshd import config

    for group, keys in config._KNOWN.items():
        assert group in sections, f"[{group}] has no section in docs/tlshd.conf.5.md"
        for key in keys:
            assert f"`{key}`" in sections[group], f"[{group}] {key} is not documented"


def test_the_documented_example_is_a_valid_configuration() -> None:
    text = (ROOT / "docs/tlshd.conf.5.md").read_text()
    example = text.split("## EXAMPLE", 1)[1].split("```")[1]
    config = parse_config(example)
    assert config.warnings == ()
    assert config.require_client_cert and config.keyrings == (".nvme",)


def test_every_command_and_option_is_documented() -> None:
    from tlshd.cli import build_parser

    text = (ROOT / "docs/tlshd.8.md").read_text()
    parser = build_parser()
    for action in parser._actions:
        for flag in action.option_strings:
            assert f"**{flag}**" in text, f"{flag} is not in docs/tlshd.8.md"
        for choice in action.choices or ():
            assert f"**{choice}**" in text, f"command {choice} is not in docs/tlshd.8.md"


# -- the converter's subset -----------------------------------------------------------------


def _roff(body: str) -> list[str]:
    return mkman.convert("# demo(8)\n\n" + body, "9.9").splitlines()[3:]


def test_title_line() -> None:
    lines = mkman.convert("# tlshd.conf(5)\n", "1.2").splitlines()
    assert lines[1] == '.TH "TLSHD.CONF" "5" "" "tlshd 1.2" "File Formats Manual"'


def test_headings_and_paragraphs() -> None:
    assert _roff("## NAME\n\ndemo - a demo\n\n### Sub\n\none\ntwo\n\nthree\n") == [
        ".SH NAME", r"demo \- a demo", ".SS Sub", "one", "two", ".PP", "three"]


def test_inline_fonts_and_literal_dashes() -> None:
    assert mkman.inline("**-c** *FILE* `--x=a-b` plain-word [site](https://x)") == (
        r"\fB\-c\fR \fIFILE\fR \fB\-\-x=a\-b\fR plain-word site")


def test_escapes() -> None:
    assert mkman.inline(".starts with a dot") == r"\&.starts with a dot"
    assert mkman.inline("a \\ backslash") == r"a \e backslash"
    assert mkman.inline("x \u2014 y") == r"x \(em y"


def test_non_ascii_without_glyph_is_refused() -> None:
    with pytest.raises(mkman.MarkdownError):
        mkman.inline("caf\u00e9")


def test_definition_list_with_two_paragraphs() -> None:
    body = "**-s**\n:   one\n    more\n\n    second\n\nafter\n"
    assert _roff(body) == [".TP", r"\fB\-s\fR", "one", "more", ".IP", "second", ".PP", "after"]


def test_bullets() -> None:
    assert _roff("* a\n  b\n* c\n") == [r".IP \(bu 2", "a", "b", r".IP \(bu 2", "c"]


def test_code_block() -> None:
    assert _roff("```\n.x -y\n```\n") == [".PP", ".RS 4", ".nf", r"\&.x \-y", ".fi", ".RE"]


@pytest.mark.parametrize("body", ["| a | b |\n", "<div>\n", "1. first\n", "```\nopen\n",
                                  "#### deep\n", "> quote\n", "# second title\n",
                                  "two\nterms\n:   definition\n"])
def test_unsupported_markdown_fails_loudly(body: str) -> None:
    with pytest.raises(mkman.MarkdownError):
        _roff(body)


def test_bad_title_fails() -> None:
    with pytest.raises(mkman.MarkdownError):
        mkman.convert("# Tlshd\n", "1")
