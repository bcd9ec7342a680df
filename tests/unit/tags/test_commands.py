"""``tlshd tags CERT`` and ``tlshd doctor``'s tag checks, on files written here."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from tests.pki import PKI
from tlshd.cli import main
from tlshd.config import parse_config
from tlshd.doctor import Level, check_tags

SITE = """
filters:
  our-ca: {type: x509.tbs.issuer, pattern: "CN=tlshd test CA,*"}
  client: {type: x509.tbs.subject, pattern: "CN=client.test,*"}
tags:
  staff: {filter: [our-ca, client]}
  outsiders: {filter: ["not our-ca"]}
"""


def config_with(tmp_path: Path, tags_dir: Path) -> Path:
    path = tmp_path / "config"
    path.write_text(f"[agent]\ntags_dir={tags_dir}\n")
    return path


def test_tags_dir_is_read_from_the_agent_group(tmp_path: Path) -> None:
    assert parse_config("[agent]\ntags_dir=/srv/tags\n").tags_dir == Path("/srv/tags")
    assert parse_config("").tags_dir == Path("/etc/tlshd/tags.d")


def test_tags_command_explains_each_tag_for_each_certificate(
        tmp_path: Path, pki: PKI, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "tags.d").mkdir()
    (tmp_path / "tags.d" / "site.yml").write_text(SITE)
    config = config_with(tmp_path, tmp_path / "tags.d")
    assert main(["tags", "-c", str(config), str(pki.client.cert),
                 str(pki.untrusted_client.cert)]) == 0
    out = capsys.readouterr().out
    first, second = out.split(str(pki.untrusted_client.cert))
    assert "subject: CN=client.test,O=tlshd tests" in first
    assert "+ staff (site.yml:6)" in first and "tags: staff" in first
    assert "not our-ca: matches -> FAILS" in first
    assert "tags: outsiders" in second


def test_tags_command_fails_on_a_file_that_is_no_certificate(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("hello")
    assert main(["tags", "-c", str(config_with(tmp_path, tmp_path)), str(junk)]) == 1
    assert "not a certificate" in capsys.readouterr().out
    assert main(["tags", "-c", str(config_with(tmp_path, tmp_path))]) == 2
    assert main(["status", str(junk)]) == 2  # only tags takes files


def test_doctor_reports_every_problem_and_an_order_dependent_reference(tmp_path: Path) -> None:
    (tmp_path / "10-filters.yml").write_text("filters:\n  v: {type: x509.tbs.version, "
                                             "pattern: \"3\"}\n")
    (tmp_path / "20-tags.yml").write_text("tags:\n  v3: {filter: [v]}\n  bad: {filter: [w]}\n")
    (tmp_path / "30-warn.yml").write_text("filters:\n  s: {type: x509.tbs.subject, pattern: x, "
                                          "purpose: [cRLSign]}\n")
    (tmp_path / "tags.example").write_text("")
    verdicts = check_tags(tmp_path, lambda: False)
    levels = [(v.level, v.detail) for v in verdicts]
    assert [lv for lv, _ in levels] == [Level.FAIL, Level.WARN, Level.WARN, Level.WARN]
    assert "20-tags.yml:3: tag bad names filter w" in levels[0][1]
    assert "extraneous" in levels[1][1]
    assert "uses filter v of 10-filters.yml" in levels[2][1]
    assert "takes no session tags" in levels[3][1] and "tags.example" in levels[3][1]


def test_doctor_is_content_with_no_directory_and_with_a_kernel_that_takes_tags(
        tmp_path: Path) -> None:
    (only,) = check_tags(tmp_path / "none", lambda: None)
    assert only.level is Level.OK and "no session tags" in only.detail
    (tmp_path / "site.yml").write_text(SITE)
    (only,) = check_tags(tmp_path, lambda: True)
    assert only.level is Level.OK and "the kernel takes them in DONE" in only.detail


def test_doctor_output_names_the_tags_check(tmp_path: Path) -> None:
    out = io.StringIO()
    (tmp_path / "bad.yml").write_text("tags: [x]\n")
    from tlshd.doctor import format_report
    lines = format_report(check_tags(tmp_path, lambda: None))
    out.write("\n".join(lines))
    assert "FAIL" in out.getvalue() and "tags" in out.getvalue()
