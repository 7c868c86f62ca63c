"""Routing decisions, abstention, batching, threads and async on a toy router."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
from tests_router_helpers import QUESTIONS

import router as router_pkg
from router import Reason, Router, Thresholds
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


def test_fitted_thresholds_and_temperature_are_sane(toy_router: Router) -> None:
    assert 0.05 < toy_router.temperature < 20
    t = toy_router.thresholds
    assert 0.0 <= t.min_confidence <= 1.0 and 0.0 <= t.min_margin <= 1.0
    assert -1.0 <= t.min_ood_score <= 1.0
    assert toy_router.prior is not None and toy_router.prior_weight > 0


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
    assert router_pkg.Router is Router
