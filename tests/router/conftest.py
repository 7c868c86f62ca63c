"""Fixtures for router tests: the hashing encoder and a router fitted on the toy corpus."""

from __future__ import annotations

import pytest
from tests_router_helpers import fit_toy_router

from router import HashingEncoder, Router


@pytest.fixture(scope="session")
def hashing_encoder() -> HashingEncoder:
    return HashingEncoder()


@pytest.fixture(scope="session")
def toy_router(hashing_encoder: HashingEncoder) -> Router:
    return fit_toy_router(hashing_encoder, max_risk=0.05)
