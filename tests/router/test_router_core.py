"""Routing decisions, abstention, batching, threads and async on a toy router."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pytest
from tests_router_helpers import LABELS, QUESTIONS, fit_toy_router, router_with_probs, toy_split

from router import HashingEncoder, Reason, Router, Thresholds
from router.calibration import softmax


def test_routes_each_domain_confidently(toy_router: Router) -> None:
    for label, text in QUESTIONS.items():
        d = toy_router.route(text)
        assert (d.label, d.predicted, d.reason) == (label, label, Reason.CONFIDENT), text
        assert d.probs[label] == max(d.probs.values())
        assert d.model_version == toy_router.model_version
        assert d.latency_ms > 0


def test_decision_fields_are_consistent(toy_router: Router) -> None:
    d = toy_router.route(QUESTIONS["code"])
    top2 = sorted(d.probs.values())[-2:]
    assert d.margin == pytest.approx(top2[1] - top2[0])
    x = toy_router.encoder.encode([QUESTIONS["code"]])
    assert d.ood_score == pytest.approx(float((x @ toy_router.prototypes.T).max()))
    expected = softmax(toy_router.logits(x), toy_router.temperature)[0]
    assert [d.probs[k] for k in toy_router.labels] == pytest.approx(expected.tolist())
    row = d.to_dict()
    assert row["reason"] == "confident" and row["label"] == "code"


@pytest.mark.parametrize(
    ("thresholds", "reason"),
    [
        (Thresholds(min_confidence=1.01), Reason.LOW_CONFIDENCE),
        (Thresholds(min_margin=1.01), Reason.LOW_MARGIN),
        (Thresholds(min_ood_score=1.01), Reason.OUT_OF_DISTRIBUTION),
    ],
)
def test_abstention_routes_experts_to_base_with_the_reason(
    toy_router: Router, thresholds: Thresholds, reason: Reason
) -> None:
    r = replace(toy_router, thresholds=thresholds)
    d = r.route(QUESTIONS["law"])
    assert (d.label, d.predicted, d.reason) == ("base", "law", reason)


def test_base_prediction_is_never_a_low_confidence_abstention(toy_router: Router) -> None:
    r = replace(toy_router, thresholds=Thresholds(min_confidence=1.01, min_margin=1.01))
    d = r.route(QUESTIONS["base"])
    assert (d.label, d.reason) == ("base", Reason.CONFIDENT)


def test_batch_keeps_input_order_and_mixes_bad_input(toy_router: Router) -> None:
    batch = [
        QUESTIONS["medical"],
        "",
        QUESTIONS["law"],
        7,
        {"messages": [{"role": "user", "content": QUESTIONS["code"]}]},
    ]
    got = [(d.label, d.reason) for d in toy_router.route_batch(batch)]
    assert got == [
        ("medical", Reason.CONFIDENT),
        ("base", Reason.EMPTY_INPUT),
        ("law", Reason.CONFIDENT),
        ("base", Reason.INVALID_INPUT),
        ("code", Reason.CONFIDENT),
    ]
    assert toy_router.route_batch([]) == []


def test_threads_give_the_same_decisions_as_a_loop(toy_router: Router) -> None:
    texts = [f"{q} {i}" for i in range(40) for q in QUESTIONS.values()]
    loop = [toy_router.route(t) for t in texts]
    with ThreadPoolExecutor(max_workers=8) as pool:
        threaded = list(pool.map(toy_router.route, texts))
    assert [(d.label, d.reason, d.probs) for d in threaded] == [
        (d.label, d.reason, d.probs) for d in loop
    ]


def test_async_routing_matches_sync(toy_router: Router) -> None:
    async def run() -> tuple[list, list]:
        singles = await asyncio.gather(*(toy_router.aroute(q) for q in QUESTIONS.values()))
        batch = await toy_router.aroute_batch(list(QUESTIONS.values()))
        return singles, batch

    singles, batch = asyncio.run(run())
    assert [d.label for d in singles] == list(QUESTIONS)
    assert [d.label for d in batch] == list(QUESTIONS)


def test_decide_embeddings_matches_route(toy_router: Router) -> None:
    x = toy_router.encoder.encode(list(QUESTIONS.values()))
    assert [d.label for d in toy_router.decide_embeddings(x)] == list(QUESTIONS)


def test_router_rejects_labels_without_base(toy_router: Router) -> None:
    with pytest.raises(ValueError, match="base label"):
        replace(toy_router, base_label="general")


def _nll(logits: np.ndarray, y: np.ndarray, temperature: float) -> float:
    z = logits / temperature
    log_p = z - z.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(y)), y].mean())


def test_fitted_temperature_and_thresholds_follow_their_rules_on_validation(
    hashing_encoder: HashingEncoder, toy_router: Router
) -> None:
    x_val, y_val = toy_split(hashing_encoder, 20, seed=1)  # the fixture's validation split
    t = toy_router.temperature
    logits = toy_router.logits(x_val)
    # the temperature minimises the validation NLL (and is not the uncalibrated 1.0)
    assert _nll(logits, y_val, t) < min(
        _nll(logits, y_val, t * 1.05), _nll(logits, y_val, t / 1.05)
    )
    assert _nll(logits, y_val, t) < _nll(logits, y_val, 1.0)
    # min_ood_score is the 0.2 % quantile of 80 validation scores: by linear interpolation it lies
    # between the lowest and the second lowest, so exactly the lowest is out of distribution
    decisions = toy_router.decide_embeddings(x_val)
    ood = [d.ood_score for d in decisions]
    flagged = [i for i, d in enumerate(decisions) if d.reason is Reason.OUT_OF_DISTRIBUTION]
    assert flagged == [int(np.argmin(ood))]
    # max_risk 0.05: of the 59 expert predictions 1 is wrong (1/59 < 0.05), so the rule keeps them
    # all: no confidence or margin threshold
    probs = toy_router.scores(x_val).probs
    pred, base = probs.argmax(axis=1), LABELS.index("base")
    expert, wrong = pred != base, pred != y_val
    assert (int(expert.sum()), int((expert & wrong).sum())) == (59, 1)
    assert (toy_router.thresholds.min_confidence, toy_router.thresholds.min_margin) == (0.0, 0.0)


def test_max_risk_zero_keeps_the_experts_more_confident_than_every_expert_error(
    hashing_encoder: HashingEncoder,
) -> None:
    router = fit_toy_router(hashing_encoder, prototypes_per_label=0, max_risk=0.0)
    x_val, y_val = toy_split(hashing_encoder, 20, seed=1)  # the helper's validation split
    probs = router.scores(x_val).probs
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    expert = pred != LABELS.index("base")
    worst_error = conf[expert & (pred != y_val)].max()
    # by hand: the lowest expert confidence above the most confident expert error
    expected = conf[expert & (conf > worst_error)].min()
    assert router.thresholds.min_confidence == pytest.approx(expected)
    decisions = router.decide_embeddings(x_val)
    sent = [(d.label, int(y)) for d, y in zip(decisions, y_val, strict=True) if d.label != "base"]
    assert sent and all(LABELS.index(label) == y for label, y in sent)  # no expert error left
    assert len(sent) == int((expert & (conf > worst_error)).sum())


def test_margin_is_the_gap_between_the_two_top_probabilities() -> None:
    probs = np.array(
        [
            [0.50, 0.30, 0.15, 0.05],  # margin 0.20
            [0.25, 0.25, 0.25, 0.25],  # a four-way tie: margin 0, the first label wins
            [0.10, 0.62, 0.26, 0.02],  # margin 0.36
            [0.35, 0.05, 0.05, 0.55],  # base: margin 0.20, never a low-margin abstention
        ]
    )
    router = replace(router_with_probs(probs), thresholds=Thresholds(min_margin=0.25))
    decisions = router.decide_embeddings(np.eye(4, dtype=np.float32))
    assert [d.margin for d in decisions] == pytest.approx([0.20, 0.0, 0.36, 0.20])
    assert [d.predicted for d in decisions] == ["law", "law", "code", "base"]
    assert [(d.label, d.reason) for d in decisions] == [
        ("base", Reason.LOW_MARGIN),
        ("base", Reason.LOW_MARGIN),
        ("code", Reason.CONFIDENT),
        ("base", Reason.CONFIDENT),
    ]


def test_import_router_is_light() -> None:
    import subprocess
    import sys

    code = (
        "import sys, router; heavy = [m for m in ('torch', 'transformers', 'lightning', "
        "'sentence_transformers', 'sklearn', 'httpx') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_client_names_load_on_first_use_from_the_client_module() -> None:
    import router
    from router import client

    for name in router._CLIENT_NAMES:
        assert getattr(router, name) is getattr(client, name)
    assert issubclass(router.ServerUnavailableError, router.ClientError)
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        router.Nope  # noqa: B018
