"""Evaluation metrics for routing decisions: scikit-learn's, plus the two it lacks (top-label ECE
and the coverage-risk curve of selective prediction)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_labels: int) -> np.ndarray:
    """``(n_labels, n_labels)`` counts; rows are true labels, columns predicted."""
    return skm.confusion_matrix(y_true, y_pred, labels=list(range(n_labels)))


def per_label_prf(
    y_true: np.ndarray, y_pred: np.ndarray, labels: Sequence[str]
) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support per label (0 where undefined)."""
    p, r, f1, support = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=list(range(len(labels))), zero_division=0
    )
    return {
        name: {
            "precision": float(p[i]),
            "recall": float(r[i]),
            "f1": float(f1[i]),
            "support": float(support[i]),
        }
        for i, name in enumerate(labels)
    }


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE: mean |accuracy - confidence| over equal-width confidence bins, weighted by
    the bins' sizes (scikit-learn has the reliability curve but not this weighted sum)."""
    if len(y_true) == 0:
        return 0.0
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(np.float64)
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    size = np.bincount(bins, minlength=n_bins)
    gap = np.abs(
        np.bincount(bins, correct, minlength=n_bins) - np.bincount(bins, conf, minlength=n_bins)
    )
    return float(gap.sum() / size.sum())


def reliability_curve(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 10) -> dict[str, list]:
    """Top-label reliability diagram (``sklearn.calibration.calibration_curve``): mean confidence
    and accuracy of each non-empty equal-width confidence bin."""
    if len(y_true) == 0:
        return {"confidence": [], "accuracy": []}
    correct = (probs.argmax(axis=1) == y_true).astype(int)
    conf = probs.max(axis=1)
    if correct.min() == correct.max():  # one class only: calibration_curve needs both
        return {"confidence": [float(conf.mean())], "accuracy": [float(correct[0])]}
    acc, mean_conf = calibration_curve(correct, conf, n_bins=n_bins, strategy="uniform")
    return {"confidence": mean_conf.tolist(), "accuracy": acc.tolist()}


def coverage_risk_curve(
    confidence: np.ndarray, correct: np.ndarray, n_points: int = 21
) -> list[dict[str, float]]:
    """Risk (error rate) of the most confident items at coverages ``0..1``; also each threshold.

    Accepting items by decreasing confidence, the point at coverage ``c`` reports the error rate
    of the ``ceil(c * n)`` most confident items and the confidence of the last one accepted.
    """
    n = len(confidence)
    if n == 0:
        return []
    order = np.argsort(-confidence, kind="stable")
    errors = np.cumsum(~correct[order].astype(bool))
    points = []
    for c in np.linspace(1.0 / n_points, 1.0, n_points):
        k = max(1, int(np.ceil(c * n)))
        points.append(
            {
                "coverage": k / n,
                "risk": float(errors[k - 1] / k),
                "threshold": float(confidence[order[k - 1]]),
            }
        )
    return points


def latency_summary(latencies_ms: Sequence[float]) -> dict[str, float]:
    a = np.asarray(latencies_ms, dtype=np.float64)
    if len(a) == 0:
        return {k: float("nan") for k in ("p50_ms", "p90_ms", "p99_ms", "mean_ms")}
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99), "mean_ms": a.mean()}


def classification_report(
    y_true: np.ndarray, y_pred: np.ndarray, labels: Sequence[str], probs: np.ndarray | None = None
) -> dict[str, Any]:
    """Accuracy, macro F1 (over labels present), per-label P/R/F1, confusion matrix and (with
    ``probs``) ECE and the reliability curve."""
    present = sorted(set(np.asarray(y_true).tolist()))
    report: dict[str, Any] = {
        "n": len(y_true),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)) if len(y_true) else 0.0,
        "macro_f1": float(skm.f1_score(y_true, y_pred, labels=present, average="macro"))
        if present
        else 0.0,
        "per_label": per_label_prf(y_true, y_pred, labels),
        "confusion_matrix": confusion_matrix(y_true, y_pred, len(labels)).tolist(),
    }
    if probs is not None:
        report["ece"] = expected_calibration_error(probs, y_true)
        report["reliability"] = reliability_curve(probs, y_true)
    return report
