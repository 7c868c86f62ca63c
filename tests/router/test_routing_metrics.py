"""Routing metrics (``loralab.routing.metrics``), checked against hand-computed numbers."""

from __future__ import annotations

import numpy as np
import pytest

from loralab.routing.metrics import (
    classification_report,
    confusion_matrix,
    coverage_risk_curve,
    expected_calibration_error,
    latency_summary,
    reliability_curve,
)


def test_confusion_matrix_and_report() -> None:
    y = np.array([0, 0, 1, 1, 2, 2])
    p = np.array([0, 1, 1, 1, 2, 0])
    cm = confusion_matrix(y, p, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    rep = classification_report(y, p, ["a", "b", "c"])
    assert rep["accuracy"] == pytest.approx(4 / 6)
    assert rep["per_label"]["a"] == pytest.approx(
        {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    )
    assert rep["per_label"]["b"]["precision"] == pytest.approx(2 / 3)
    assert rep["per_label"]["c"] == pytest.approx(
        {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2}
    )


def test_ece_is_zero_when_confidence_matches_accuracy_and_large_when_not() -> None:
    probs = np.array([[0.75, 0.25]] * 4)
    assert expected_calibration_error(probs, np.array([0, 0, 0, 1])) == pytest.approx(0.0)
    assert expected_calibration_error(probs, np.array([1, 1, 1, 1])) == pytest.approx(0.75)


def test_coverage_risk_curve() -> None:
    conf = np.array([0.9, 0.8, 0.7, 0.6])
    correct = np.array([True, True, False, False])
    pts = coverage_risk_curve(conf, correct, n_points=4)
    assert [p["coverage"] for p in pts] == [0.25, 0.5, 0.75, 1.0]
    assert [p["risk"] for p in pts] == pytest.approx([0.0, 0.0, 1 / 3, 0.5])
    assert [p["threshold"] for p in pts] == pytest.approx([0.9, 0.8, 0.7, 0.6])


def test_latency_summary() -> None:
    s = latency_summary(list(range(1, 101)))
    assert s["p50_ms"] == pytest.approx(50.5) and s["p99_ms"] == pytest.approx(99.01)


def test_ece_weights_bins_by_size() -> None:
    # bin 0.9: 3 items, all correct (gap 0.1); bin 0.6: 1 item, wrong (gap 0.6) -> (0.3 + 0.6) / 4
    probs = np.array([[0.9, 0.1]] * 3 + [[0.6, 0.4]])
    assert expected_calibration_error(probs, np.array([0, 0, 0, 1])) == pytest.approx(0.225)


def test_reliability_curve_bins_confidence_against_accuracy() -> None:
    probs = np.array([[0.9, 0.1]] * 4 + [[0.55, 0.45]] * 2)
    curve = reliability_curve(probs, np.array([0, 0, 0, 1, 0, 1]), n_bins=10)
    assert curve["confidence"] == pytest.approx([0.55, 0.9])
    assert curve["accuracy"] == pytest.approx([0.5, 0.75])


def test_report_without_a_label_in_truth_averages_f1_over_present_labels() -> None:
    y = np.array([0, 0, 1, 1])
    rep = classification_report(y, np.array([0, 0, 1, 2]), ["a", "b", "c"])
    assert rep["macro_f1"] == pytest.approx((1.0 + 2 / 3) / 2)
    assert rep["per_label"]["c"] == pytest.approx(
        {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    )
