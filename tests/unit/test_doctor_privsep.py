"""tlshd doctor's privilege-separation check: tried for real in a child, strict on what would
stop the workers, and on a directory trust store the handshake processes cannot read."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tlshd.config import load_config
from tlshd.doctor import Level, check_privsep, confine_verdict

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="separation needs root")


def _config(tmp_path: Path, agent: str = "", client: str = ""):
    path = tmp_path / "config"
    path.write_text(f"[authenticate.client]\n{client}\n[agent]\n{agent}\n")
    return load_config(path)


def test_the_confinement_is_tried_and_reported(tmp_path: Path) -> None:
    (verdict,) = check_privsep(_config(tmp_path))
    assert verdict.level is Level.OK, verdict
    assert "nobody" in verdict.detail and "CapEff 0" in verdict.detail


def test_off_is_a_warning_and_an_unknown_user_a_failure(tmp_path: Path) -> None:
    (off,) = check_privsep(_config(tmp_path, "privsep=false"))
    assert off.level is Level.WARN and off.fix == "[agent] privsep=true"
    (unknown,) = check_privsep(_config(tmp_path, "worker_user=tlshd-no-such-user"))
    assert unknown.level is Level.FAIL and "no user" in unknown.detail


def test_a_confinement_that_fails_names_the_units_settings() -> None:
    verdict = confine_verdict("nobody", "cannot become 'nobody': Operation not permitted")
    assert verdict.level is Level.FAIL and verdict.fix and "CAP_SETUID" in verdict.fix


def test_a_directory_trust_store_the_handshake_processes_cannot_read_fails(
        tmp_path: Path) -> None:
    store = tmp_path / "ca.d"
    store.mkdir(mode=0o700)
    verdicts = check_privsep(_config(tmp_path, client=f"x509.truststore={store}"))
    (bad,) = [v for v in verdicts if v.check == "client trust store"]
    assert bad.level is Level.FAIL and bad.fix == f"chmod o+rx {store}"
    store.chmod(0o755)
    assert [v.check for v in check_privsep(_config(tmp_path, client=f"x509.truststore={store}"))
            ] == ["privilege separation"]
