"""Fixtures shared by the test tiers."""

from __future__ import annotations

import pytest

from tests.pki import PKI, write_pki


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """A throwaway PKI (tests/pki.py), written once per session."""
    return write_pki(tmp_path_factory.mktemp("pki"))
