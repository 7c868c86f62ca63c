"""Temperature scaling and threshold fitting, checked against hand-computed numbers."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from tests_router_helpers import router_with_probs

from router import Reason
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


# A validation set of seven expert predictions and one base prediction (labels law, code, medical,
# base), with the top probability, the top-two margin and whether the prediction is right:
VAL_PROBS = np.array(
    [
        [0.90, 0.04, 0.03, 0.03],  # conf .90  margin .86  law   right
        [0.80, 0.10, 0.05, 0.05],  # conf .80  margin .70  law   right
        [0.60, 0.30, 0.05, 0.05],  # conf .60  margin .30  law   right
        [0.50, 0.45, 0.03, 0.02],  # conf .50  margin .05  law   WRONG (code)
        [0.45, 0.20, 0.20, 0.15],  # conf .45  margin .25  law   right
        [0.40, 0.35, 0.15, 0.10],  # conf .40  margin .05  law   WRONG (code)
        [0.35, 0.30, 0.20, 0.15],  # conf .35  margin .05  law   WRONG (medical)
        [0.10, 0.10, 0.10, 0.70],  # base prediction: never abstains, not fitted on
    ]
)
VAL_Y = np.array([0, 0, 0, 1, 0, 1, 2, 3])


def _fitted(**rule: float) -> tuple[list, Thresholds]:
    router = router_with_probs(VAL_PROBS)
    x = np.eye(len(VAL_PROBS), dtype=np.float32)
    t = fit_thresholds(router.scores(x).probs, VAL_Y, 3, np.ones(len(x)), **rule)
    return replace(router, thresholds=t).decide_embeddings(x), t


def test_max_risk_picks_the_lowest_threshold_whose_accepted_experts_meet_the_risk() -> None:
    # By hand, accepting the expert predictions from the most confident down: down to .50 the
    # error rate is 1/4, to .45 it is 1/5 = 0.20, to .40 2/6 = 0.33, to .35 3/7 = 0.43. With
    # max_risk 0.25 the lowest threshold that keeps the risk is .45, and the accepted five need
    # no margin threshold (their risk is already 0.20).
    decisions, t = _fitted(max_risk=0.25)
    assert t.min_confidence == pytest.approx(0.45)
    assert t.min_margin == 0.0
    assert [d.reason for d in decisions] == [Reason.CONFIDENT] * 5 + [Reason.LOW_CONFIDENCE] * 2 + [
        Reason.CONFIDENT
    ]
    assert [d.label for d in decisions] == ["law"] * 5 + ["base"] * 3
    # with max_risk 0.0 only the three above the first error are kept
    decisions, t = _fitted(max_risk=0.0)
    assert t.min_confidence == pytest.approx(0.60)
    assert [d.label for d in decisions] == ["law"] * 3 + ["base"] * 5


@pytest.mark.parametrize(("coverage", "kept"), [(1.0, 7), (0.8, 6), (0.5, 4), (0.1, 1)])
def test_target_coverage_sends_that_share_of_expert_predictions_to_experts(
    coverage: float, kept: int
) -> None:
    # kept = ceil(coverage * 7) of the seven expert predictions, the most confident ones
    decisions, _ = _fitted(target_coverage=coverage)
    to_expert = [d.label != "base" for d in decisions[:7]]
    assert to_expert == [True] * kept + [False] * (7 - kept)
    assert all(d.reason is Reason.LOW_CONFIDENCE for d in decisions[kept:7])
    assert decisions[7].reason is Reason.CONFIDENT and decisions[7].label == "base"


def test_thresholds_need_exactly_one_rule() -> None:
    p = np.array([[0.9, 0.1]])
    with pytest.raises(ValueError, match="exactly one"):
        fit_thresholds(p, np.array([0]), 1, np.ones(1))
    # the default thresholds never abstain, not even on a four-way tie
    tie = router_with_probs(np.full((1, 4), 0.25))
    assert tie.thresholds == Thresholds()
    (d,) = tie.decide_embeddings(np.eye(1, dtype=np.float32))
    assert (d.label, d.reason, d.margin) == ("law", Reason.CONFIDENT, 0.0)
