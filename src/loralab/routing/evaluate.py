"""Router evaluation on embedded sets, the two baselines, and decision latency."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from loralab.routing.metrics import classification_report, coverage_risk_curve, latency_summary
from router import Decision, Router
from router.classifier import DescriptionPrior
from router.encoders import Encoder


def evaluate_router(
    router: Router, x: np.ndarray, y: np.ndarray, groups: Sequence[str]
) -> dict[str, Any]:
    """Metrics of the router's final decisions (abstentions count as ``base``) on ``x`` ``(n, dim)``.

    Also: the classifier's accuracy before abstention, the abstention rate and reasons, accuracy
    per source group, ECE of the calibrated probabilities and the coverage-risk curve.
    """
    labels = list(router.labels)
    scores = router.scores(x)
    decisions = router.decide_embeddings(x)
    final = np.array([labels.index(d.label) for d in decisions])
    raw = scores.probs.argmax(axis=1)
    report = classification_report(y, final, labels, scores.probs)
    report["accuracy_before_abstention"] = float((raw == y).mean()) if len(y) else 0.0
    report["abstention_rate"] = (
        float(np.mean([d.abstained for d in decisions])) if decisions else 0.0
    )
    report["reasons"] = dict(Counter(d.reason.value for d in decisions))
    report.update(selective_summary(decisions, y, labels, router.base_label))
    report["per_group_accuracy"] = group_accuracy(final == y, groups)
    report["coverage_risk"] = coverage_risk_curve(scores.probs.max(axis=1), raw == y)
    return report


def selective_summary(
    decisions: Sequence[Decision], y: np.ndarray, labels: Sequence[str], base_label: str
) -> dict[str, float]:
    """What abstention buys: of the requests sent to an expert (``coverage`` = their share), the
    share sent to the wrong one (``expert_risk``); ``confident_errors`` = wrong confident decisions
    over all requests; ``caught_errors`` = share of the classifier's wrong predictions that
    abstention turned into a correct ``base`` or at least kept from a wrong expert."""
    pred = np.array([labels.index(d.predicted or d.label) for d in decisions])
    final = np.array([labels.index(d.label) for d in decisions])
    to_expert = final != labels.index(base_label)
    wrong_pred = pred != y
    abstained = np.array([d.abstained for d in decisions], dtype=bool)
    n = max(1, len(y))
    return {
        "coverage": float(to_expert.mean()) if len(y) else 0.0,
        "expert_risk": float((final[to_expert] != y[to_expert]).mean()) if to_expert.any() else 0.0,
        "confident_errors": float(((final != y) & ~abstained).sum() / n),
        "caught_errors": float((wrong_pred & abstained).sum() / max(1, wrong_pred.sum())),
    }


def group_accuracy(correct: np.ndarray, groups: Sequence[str]) -> dict[str, dict[str, float]]:
    out = {}
    g = np.asarray(groups)
    for name in sorted(set(groups)):
        m = g == name
        out[name] = {"accuracy": float(correct[m].mean()), "n": int(m.sum())}
    return out


def nearest_centroid_predict(
    x_train: np.ndarray, y_train: np.ndarray, n_labels: int, x: np.ndarray
) -> np.ndarray:
    """Semantic-router style baseline: the label whose mean training embedding is most similar."""
    centroids = np.stack([x_train[y_train == k].mean(axis=0) for k in range(n_labels)])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    return (x @ centroids.T).argmax(axis=1)


def zero_shot_predict(prior: DescriptionPrior, x: np.ndarray) -> np.ndarray:
    """Zero-shot baseline: the label with the most similar description (no training data)."""
    return prior.similarities(x).argmax(axis=1)


class _TimedEncoder:
    """Wraps an encoder and records how long each ``encode`` call took (ms)."""

    def __init__(self, inner: Encoder) -> None:
        self.inner = inner
        self.name, self.dim, self.max_seq_length = inner.name, inner.dim, inner.max_seq_length
        self.last_ms = 0.0

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        t0 = time.perf_counter()
        out = self.inner.encode(texts, batch_size)
        self.last_ms = (time.perf_counter() - t0) * 1000.0
        return out

    def fingerprint(self) -> dict[str, Any]:
        return self.inner.fingerprint()


def measure_latency(router: Router, requests: Sequence[Any], warmup: int = 5) -> dict[str, float]:
    """One request at a time: p50 / p90 / p99 of the whole decision (ms), the encoder's share.

    The encoder is timed inside the same calls, so ``overhead_ratio`` = total decision time /
    total encoder time over all requests is a paired measurement, insensitive to CPU noise.
    """
    timed = _TimedEncoder(router.encoder)
    r = replace(router, encoder=timed)
    for req in requests[:warmup]:
        r.route(req)
    total_ms, encoder_ms = [], []
    for req in requests:
        timed.last_ms = 0.0
        t0 = time.perf_counter()
        r.route(req)
        total_ms.append((time.perf_counter() - t0) * 1000.0)
        encoder_ms.append(timed.last_ms)
    out = latency_summary(total_ms)
    out["encoder_p50_ms"] = latency_summary(encoder_ms)["p50_ms"]
    out["overhead_ratio"] = (
        float(sum(total_ms) / sum(encoder_ms)) if sum(encoder_ms) else float("nan")
    )
    return out


def batch_throughput(router: Router, requests: Sequence[Any], batch_size: int = 32) -> float:
    """Requests per second through ``route_batch`` in batches of ``batch_size``."""
    t0 = time.perf_counter()
    for i in range(0, len(requests), batch_size):
        router.route_batch(requests[i : i + batch_size])
    return len(requests) / (time.perf_counter() - t0)
