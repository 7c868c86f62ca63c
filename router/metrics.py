"""Evaluation metrics for routing decisions (numpy only)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_labels: int) -> np.ndarray:
    """``(n_labels, n_labels)`` counts; rows are true labels, columns predicted."""
    cm = np.zeros((n_labels, n_labels), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def per_label_prf(cm: np.ndarray, labels: Sequence[str]) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support per label from a confusion matrix (0 where undefined)."""
    out = {}
    for i, name in enumerate(labels):
        tp = float(cm[i, i])
        predicted, support = float(cm[:, i].sum()), float(cm[i, :].sum())
        p = tp / predicted if predicted else 0.0
        r = tp / support if support else 0.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        out[name] = {"precision": p, "recall": r, "f1": f1, "support": support}
    return out


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE: mean |accuracy - confidence| over equal-width confidence bins, weighted."""
    if len(y_true) == 0:
        return 0.0
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(np.float64)
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


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
        return {
            "p50_ms": float("nan"),
            "p90_ms": float("nan"),
            "p99_ms": float("nan"),
            "mean_ms": float("nan"),
        }
    return {
        "p50_ms": float(np.percentile(a, 50)),
        "p90_ms": float(np.percentile(a, 90)),
        "p99_ms": float(np.percentile(a, 99)),
        "mean_ms": float(a.mean()),
    }


def classification_report(
    y_true: np.ndarray, y_pred: np.ndarray, labels: Sequence[str], probs: np.ndarray | None = None
) -> dict[str, Any]:
    """Accuracy, macro F1, per-label P/R/F1, confusion matrix and (with ``probs``) ECE."""
    cm = confusion_matrix(y_true, y_pred, len(labels))
    prf = per_label_prf(cm, labels)
    present = [v["f1"] for v in prf.values() if v["support"] > 0]
    report: dict[str, Any] = {
        "n": len(y_true),
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else 0.0,
        "macro_f1": float(np.mean(present)) if present else 0.0,
        "per_label": prf,
        "confusion_matrix": cm.tolist(),
    }
    if probs is not None:
        report["ece"] = expected_calibration_error(probs, y_true)
    return report
