"""Fixtures for router tests: the hashing encoder and a router fitted on the toy corpus."""

from __future__ import annotations

import pytest
from tests_router_helpers import DESCRIPTIONS, LABELS, toy_split

from router import HashingEncoder, InputPolicy, Router
from router.fitting import FitConfig, fit_router


@pytest.fixture(scope="session")
def hashing_encoder() -> HashingEncoder:
    return HashingEncoder()


@pytest.fixture(scope="session")
def toy_router(hashing_encoder: HashingEncoder) -> Router:
    x_train, y_train = toy_split(hashing_encoder, 60, seed=0)
    x_val, y_val = toy_split(hashing_encoder, 20, seed=1)
    cfg = FitConfig(c=10.0, prior_weight=0.5, prototypes_per_label=8, max_risk=0.05)
    return fit_router(
        hashing_encoder,
        LABELS,
        x_train,
        y_train,
        x_val,
        y_val,
        descriptions=DESCRIPTIONS,
        policy=InputPolicy(),
        config=cfg,
    )
