"""Temperature scaling and abstention thresholds, fitted on a validation split."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature``; ``(n, k)`` -> ``(n, k)``."""
    z = logits / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of labels ``y`` ``(n,)`` under ``softmax(logits / T)``."""
    z = logits / temperature
    m = z.max(axis=1, keepdims=True)
    log_z = (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]
    return float(np.mean(log_z - z[np.arange(len(y)), y]))


def fit_temperature(logits: np.ndarray, y: np.ndarray, lo: float = 0.02, hi: float = 50.0) -> float:
    """The temperature minimising validation NLL (golden-section search over log T).

    NLL is convex in 1/T, hence unimodal in log T, so the search finds the global minimum.
    """
    if len(y) == 0:
        return 1.0
    a, b = math.log(lo), math.log(hi)
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = nll(logits, y, math.exp(c)), nll(logits, y, math.exp(d))
    for _ in range(60):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = nll(logits, y, math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = nll(logits, y, math.exp(d))
    return math.exp((a + b) / 2)


@dataclass(frozen=True)
class Thresholds:
    """Abstain (route to ``base``) when ``ood_score < min_ood_score``, the top probability is
    under ``min_confidence`` or the top-two margin is under ``min_margin``."""

    min_confidence: float = 0.0
    min_margin: float = 0.0
    min_ood_score: float = -1.0

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _selective_threshold(
    score: np.ndarray, correct: np.ndarray, target_coverage: float | None, max_risk: float | None
) -> float:
    """Threshold on ``score`` keeping ``target_coverage`` of the items, or the lowest threshold
    whose accepted items have error rate <= ``max_risk`` (exactly one of the two is given)."""
    if (target_coverage is None) == (max_risk is None):
        raise ValueError("give exactly one of target_coverage and max_risk")
    if len(score) == 0:
        return 0.0
    order = np.argsort(-score, kind="stable")
    s, ok = score[order], correct[order]
    if target_coverage is not None:
        if not 0 < target_coverage <= 1:
            raise ValueError(f"target_coverage must be in (0, 1], got {target_coverage}")
        keep = max(1, math.ceil(target_coverage * len(s)))
        return float(s[keep - 1]) if keep < len(s) else 0.0
    assert max_risk is not None
    errors = np.cumsum(~ok)
    risk = errors / np.arange(1, len(s) + 1)
    feasible = np.flatnonzero(risk <= max_risk)
    if len(feasible) == 0:
        return float(s[0])  # not even the most confident item meets the risk: accept (almost) none
    last = int(feasible[-1])
    return 0.0 if last == len(s) - 1 else float(s[last])


def fit_thresholds(
    probs: np.ndarray,
    y: np.ndarray,
    base_index: int,
    ood_scores: np.ndarray,
    *,
    target_coverage: float | None = None,
    max_risk: float | None = None,
    ood_quantile: float = 0.002,
) -> Thresholds:
    """Fit the three thresholds on validation outputs.

    Only predictions of an expert can abstain (a ``base`` prediction already routes to base), so
    confidence and margin thresholds are fitted over items predicted as an expert: first
    confidence, then (``max_risk`` only) margin over the items that pass it, so that
    ``target_coverage`` is the share of expert predictions kept. ``min_ood_score`` is the
    ``ood_quantile`` quantile of the validation OOD scores.
    """
    pred = probs.argmax(axis=1)
    correct = pred == y
    expert = pred != base_index
    top2 = np.sort(probs, axis=1)[:, -2:]
    conf, margin = top2[:, 1], top2[:, 1] - top2[:, 0]
    t_conf = _selective_threshold(conf[expert], correct[expert], target_coverage, max_risk)
    passed = expert & (conf >= t_conf)
    # In coverage mode the confidence threshold already keeps target_coverage of the expert
    # predictions; a margin threshold at the same coverage would keep that share of them again.
    t_margin = (
        0.0
        if target_coverage is not None
        else _selective_threshold(margin[passed], correct[passed], None, max_risk)
    )
    t_ood = float(np.quantile(ood_scores, ood_quantile)) if len(ood_scores) else -1.0
    return Thresholds(min_confidence=t_conf, min_margin=t_margin, min_ood_score=t_ood)
