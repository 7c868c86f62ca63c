"""The packaged MiniLM encoder: an int8 encoder's embedding of a text does not depend on the
texts it is encoded with, so a request routed in a batch gets the decision it gets alone."""

import numpy as np
import pytest

from router.encoders import EncoderSpec, SentenceTransformerEncoder
from tests.router.tests_router_helpers import LABELS, QUESTIONS, fit_toy_router

TEXTS = [
    "What is the statute of limitations for breach of a written contract?",
    "def f(xs):\n    return sorted(xs)[::-1]\n\nWhat does f([3, 1, 2]) return?",
    "A 47-year-old woman presents with fatigue, weight gain and cold intolerance. " * 6,
    "Hi",
    "Explain how the Federal Reserve uses open market operations to change interest rates.",
]


@pytest.fixture(scope="module")
def int8() -> SentenceTransformerEncoder:
    return SentenceTransformerEncoder(EncoderSpec(quantize="int8"))


def test_an_int8_embedding_is_the_same_alone_and_in_any_batch(int8):
    alone = np.concatenate([int8.encode([t]) for t in TEXTS])
    together = int8.encode(TEXTS, batch_size=64)
    reversed_pairs = int8.encode(TEXTS[::-1], batch_size=2)[::-1]
    np.testing.assert_array_equal(together, alone)
    np.testing.assert_array_equal(reversed_pairs, alone)
    np.testing.assert_allclose(np.linalg.norm(alone, axis=1), 1.0, rtol=1e-5)
    assert int8.fingerprint()["encode"] == "per_text"


def test_the_fp32_encoder_batches_and_agrees_with_int8_to_quantisation_error(int8):
    fp32 = SentenceTransformerEncoder(EncoderSpec(quantize=None))
    alone = np.concatenate([fp32.encode([t]) for t in TEXTS])
    np.testing.assert_allclose(fp32.encode(TEXTS, batch_size=64), alone, atol=1e-5)
    assert "encode" not in fp32.fingerprint()
    assert float((alone * int8.encode(TEXTS)).sum(axis=1).min()) > 0.95


def test_a_batch_of_requests_gets_the_decisions_each_gets_alone(int8):
    router = fit_toy_router(int8)
    requests = [QUESTIONS[label] for label in LABELS] + TEXTS
    batched = router.route_batch(requests)
    for request, decision in zip(requests, batched, strict=True):
        single = router.route(request)
        assert (decision.label, decision.reason) == (single.label, single.reason)
        # the same embedding; only the head's float32 matmul rounds by batch shape (BLAS)
        assert decision.probs == pytest.approx(single.probs, rel=1e-4, abs=1e-9)


def test_a_router_saved_by_an_int8_encoder_that_batched_is_refused(int8, tmp_path):
    import json

    from router import EncoderMismatchError, Router

    fit_toy_router(int8).save(tmp_path / "r")
    assert Router.load(tmp_path / "r").route(QUESTIONS["law"]).label == "law"
    config = json.loads((tmp_path / "r" / "router.json").read_text())
    del config["encoder"]["fingerprint"]["encode"]  # as routers were saved before per-text int8
    (tmp_path / "r" / "router.json").write_text(json.dumps(config))
    with pytest.raises(EncoderMismatchError, match="encode: saved None, now 'per_text'"):
        Router.load(tmp_path / "r")
