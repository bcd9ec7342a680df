"""The man pages: committed roff equals a fresh pandoc build from docs/*.md, and renders cleanly.

tools/mkman.py runs pandoc (Debian's package; scripts/setup --dev installs it). These tests
keep the Markdown sources and the committed pages in step, and read the rendered pages for
Markdown that leaked through (the old hand-written converter left stray backticks).
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
    stale = mkman.stale_pages(ROOT)
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
    leaked = [line for line in result.stdout.splitlines()
              if re.search(r"`|\*\*|\]\(|^\s*#|<!--", line)]
    assert not leaked, f"Markdown syntax in the rendered page: {leaked[:5]}"


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
    sections = dict(re.findall(r"^# \[([^\]]+)\]\n(.*?)(?=^# |\Z)", text, re.M | re.S))
    from tlshd import config

    for group, keys in config._KNOWN.items():
        assert group in sections, f"[{group}] has no section in docs/tlshd.conf.5.md"
        for key in keys:
            assert f"`{key}`" in sections[group], f"[{group}] {key} is not documented"


def test_the_documented_example_is_a_valid_configuration() -> None:
    text = (ROOT / "docs/tlshd.conf.5.md").read_text()
    example = text.split("# EXAMPLE", 1)[1].split("```")[1]
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


def test_footer_names_the_package_version() -> None:
    from tlshd import __version__

    for page in mkman.PAGES.values():
        th = next(line for line in (ROOT / page).read_text().splitlines()
                  if line.startswith(".TH "))
        assert f"tlshd {__version__}" in th, th


def test_a_missing_pandoc_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mkman.shutil, "which", lambda name: None)
    with pytest.raises(mkman.ToolchainError, match="apt-get install pandoc"):
        mkman.pandoc()
