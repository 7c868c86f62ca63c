"""Temperature scaling and threshold fitting, checked against hand-computed numbers."""

from __future__ import annotations

import numpy as np
import pytest

from router.calibration import Thresholds, fit_temperature, fit_thresholds, nll, softmax


def test_softmax_rows_sum_to_one_and_respect_temperature() -> None:
    z = np.array([[0.0, np.log(3.0)]])
    assert softmax(z)[0].tolist() == pytest.approx([0.25, 0.75])
    assert softmax(z, temperature=1e9)[0] == pytest.approx([0.5, 0.5])


def test_fit_temperature_recovers_the_generating_temperature() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4000, 4)) * 3
    true_t = 2.5
    p = softmax(logits, true_t)
    y = np.array([rng.choice(4, p=row) for row in p])
    t = fit_temperature(logits, y)
    assert t == pytest.approx(true_t, rel=0.1)
    assert nll(logits, y, t) <= nll(logits, y, 1.0)


def test_thresholds_for_target_coverage() -> None:
    # 10 expert predictions with confidences 0.55..1.0 (label 0), one base prediction (label 1)
    conf = np.linspace(0.55, 1.0, 10)
    probs = np.stack([conf, 1 - conf], axis=1)
    probs = np.vstack([probs, [[0.2, 0.8]]])
    y = np.zeros(11, dtype=int)
    y[-1] = 1
    t = fit_thresholds(
        probs, y, base_index=1, ood_scores=np.linspace(0, 1, 11), target_coverage=0.8
    )
    assert t.min_confidence == pytest.approx(conf[2])  # keeps the 8 most confident of 10
    assert t.min_ood_score == pytest.approx(np.quantile(np.linspace(0, 1, 11), 0.002))


def test_thresholds_for_max_risk_drop_the_least_confident_errors() -> None:
    conf = np.array([0.99, 0.95, 0.9, 0.8, 0.7, 0.6])
    probs = np.stack([conf, 1 - conf], axis=1)
    y = np.array([0, 0, 0, 0, 1, 1])  # the two least confident expert predictions are wrong
    t = fit_thresholds(probs, y, base_index=1, ood_scores=np.ones(6), max_risk=0.0)
    assert t.min_confidence == pytest.approx(0.8)
    t_all = fit_thresholds(probs, y, base_index=1, ood_scores=np.ones(6), max_risk=0.5)
    assert t_all.min_confidence == 0.0


def test_thresholds_need_exactly_one_rule() -> None:
    p = np.array([[0.9, 0.1]])
    with pytest.raises(ValueError, match="exactly one"):
        fit_thresholds(p, np.array([0]), 1, np.ones(1))
    assert Thresholds().to_dict() == {
        "min_confidence": 0.0,
        "min_margin": 0.0,
        "min_ood_score": -1.0,
    }
