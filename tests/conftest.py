"""Fixtures shared by the test tiers."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from tests.pki import PKI, write_pki

# Hypothesis: the default (100 examples a target) in CI; scripts/fuzz runs "nightly".
settings.register_profile("nightly", max_examples=20_000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """A throwaway PKI (tests/pki.py), written once per session."""
    return write_pki(tmp_path_factory.mktemp("pki"))
