"""tlshd install: units with the right ExecStart=, and the commented default configuration."""

from __future__ import annotations

import io
import re
from pathlib import Path

from tlshd.config import _KNOWN, Config, parse_config
from tlshd.install import UNITS, install, packaged, render_unit


def test_install_writes_both_units_pointing_at_this_tlshd_and_the_default_config(
        tmp_path: Path) -> None:
    out = io.StringIO()
    assert install(tmp_path, "/opt/venv/bin/tlshd", out) == 0
    for name in UNITS:
        text = (tmp_path / "etc/systemd/system" / name).read_text()
        assert re.findall(r"^ExecStart=.*$", text, re.M) == ["ExecStart=/opt/venv/bin/tlshd"]
    config = tmp_path / "etc/tlshd/config"
    assert config.read_text() == packaged("config")
    assert config.stat().st_mode & 0o777 == 0o644
    assert "systemctl daemon-reload" in out.getvalue()


def test_install_keeps_an_existing_configuration_and_the_old_unit(tmp_path: Path) -> None:
    legacy = tmp_path / "etc/tlshd.conf"
    legacy.parent.mkdir(parents=True)
    legacy.write_text("[debug]\nloglevel=10\n")
    unit = tmp_path / "etc/systemd/system/tlshd.service"
    unit.parent.mkdir(parents=True)
    unit.write_text("[Service]\nExecStart=/usr/sbin/tlshd\n")
    out = io.StringIO()
    install(tmp_path, "/usr/local/bin/tlshd", out)
    assert not (tmp_path / "etc/tlshd/config").exists()
    assert legacy.read_text() == "[debug]\nloglevel=10\n"
    assert (unit.parent / "tlshd.service.orig").read_text().endswith("/usr/sbin/tlshd\n")
    assert "left as it is" in out.getvalue()


def test_default_configuration_documents_every_key_and_means_the_defaults() -> None:
    text = packaged("config")
    cfg = parse_config(text)
    assert cfg == Config() and cfg.warnings == ()
    for group, keys in _KNOWN.items():
        assert f"\n[{group}]\n" in text
        for key in keys:
            assert re.search(rf"^#{re.escape(key)}=", text, re.M), f"[{group}] {key}"


def test_every_commented_default_is_the_real_default() -> None:
    """Uncommenting a line that shows a value must not change anything."""
    text = packaged("config")
    values = re.sub(r"^#(\w[\w.]*=[^<\n]+)$", r"\1", text, flags=re.M)
    values = re.sub(r"^#(metrics=)$", r"\1", values, flags=re.M)
    cfg = parse_config(values)
    assert cfg == Config() and cfg.warnings == ()


def test_a_unit_without_the_distribution_execstart_is_refused() -> None:
    assert render_unit("tlshd.service", "/x/tlshd").count("ExecStart=/x/tlshd\n") == 1
