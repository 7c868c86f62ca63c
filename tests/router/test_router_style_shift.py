"""The style shift: how the head and the prior combine where the head gate is not fully open."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from scipy.special import log_softmax
from tests_router_helpers import (
    LABELS,
    QUESTIONS,
    fit_toy_router,
    rotated_style_set,
    toy_split,
)

from router import HashingEncoder, Router
from router.classifier import StyleShift
from router.fitting import fit_style_shift, off_style_rows, style_shift_train_weights


def test_style_shift_logits_worked_by_hand() -> None:
    shift = StyleShift(np.array([[0.0, 0.0], [1.0, 0.0]]), np.array([0.0, 0.5]), head_scale=-1.0)
    gate = np.array([1.0, 0.5, 0.0])
    head = np.tile([1.0, 0.0], (3, 1))
    prior = np.tile([2.0, 1.0], (3, 1))
    # g = 1: head + prior; g = 0.5: 0.5 * 0.5 * head + prior + 0.5 * ([0, 2] + [0, 0.5]);
    # g = 0: prior + [0, 2.5]
    assert shift.logits(gate, head, prior).tolist() == [[3.0, 1.0], [2.25, 2.25], [2.0, 3.5]]
    with pytest.raises(ValueError, match=r"prior_mix \(k, k\) and bias \(k,\)"):
        StyleShift(np.zeros((2, 3)), np.zeros(2), 0.0)


def test_style_shift_embedding_term_worked_by_hand() -> None:
    weight = np.array([[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]])  # (k=2, dim=3)
    shift = StyleShift(np.zeros((2, 2)), np.zeros(2), 0.0, embedding_weight=weight)
    gate = np.array([1.0, 0.5])
    head = np.zeros((2, 2))
    prior = np.tile([1.0, 1.0], (2, 1))
    x = np.array([[1.0, 1.0, 1.0], [3.0, 1.0, 1.0]])
    # g = 1: the prior alone; g = 0.5: prior + 0.5 * [3 - 1, 2]
    assert shift.logits(gate, head, prior, x).tolist() == [[1.0, 1.0], [2.0, 2.0]]
    with pytest.raises(ValueError, match="needs embeddings of dim 3, got None"):
        shift.logits(gate, head, prior)
    with pytest.raises(ValueError, match=r"needs embeddings of dim 3, got \(2, 4\)"):
        shift.logits(gate, head, prior, np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"embedding_weight needs shape \(2, dim\)"):
        StyleShift(np.zeros((2, 2)), np.zeros(2), 0.0, embedding_weight=np.zeros((3, 4)))


def test_fit_style_shift_recovers_a_known_shift() -> None:
    # Labels drawn from softmax(prior + u * b) on requests off the training style (u = 1 - gate):
    # the fitted bias comes back (a bias is defined up to a constant; this one sums to zero).
    rng = np.random.default_rng(0)
    n, true_bias = 20_000, np.array([1.0, -1.0, 0.0])
    gate = rng.uniform(0.0, 1.0, n)
    head = np.zeros((n, 3))
    prior = rng.normal(0.0, 1.0, (n, 3))
    z = prior + (1 - gate)[:, None] * true_bias
    p = np.exp(z - z.max(axis=1, keepdims=True))
    y = np.array([rng.choice(3, p=row / row.sum()) for row in p])
    shift = fit_style_shift(gate, head, prior, y, l2=0.0)
    assert shift.bias == pytest.approx(true_bias, abs=0.1)
    assert np.abs(shift.prior_mix).max() < 0.1

    def nll(s: StyleShift) -> float:
        return float(-log_softmax(s.logits(gate, head, prior), axis=1)[np.arange(n), y].mean())

    zero = StyleShift(np.zeros((3, 3)), np.zeros(3), 0.0)
    assert nll(shift) < nll(zero) - 0.05
    # a large penalty keeps it near no shift at all
    assert np.abs(fit_style_shift(gate, head, prior, y, l2=100.0).bias).max() < 0.01
    # fitted at a temperature: the same shift as on logits divided by it, its bias scaled back
    at_2 = fit_style_shift(gate, head, 2.0 * prior, y, l2=0.0, temperature=2.0)
    assert at_2.bias == pytest.approx(2.0 * shift.bias, abs=1e-3)
    assert at_2.prior_mix == pytest.approx(shift.prior_mix, abs=1e-3)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        fit_style_shift(gate, head, prior, y, temperature=0.0)
    with pytest.raises(ValueError, match="style shift inputs disagree"):
        fit_style_shift(gate[:10], head, prior, y)
    with pytest.raises(ValueError, match="style_shift_l2 must be >= 0"):
        fit_style_shift(gate, head, prior, y, l2=-1.0)


def test_fit_style_shift_recovers_a_known_embedding_term() -> None:
    # Labels drawn from softmax(prior + u * x W^T): W comes back (defined up to a vector added to
    # every row; this one's columns sum to zero), and only with the embedding term is it learnt.
    rng = np.random.default_rng(1)
    n, dim = 20_000, 2
    true_w = np.array([[1.5, 0.0], [-1.5, 1.0], [0.0, -1.0]])
    gate = rng.uniform(0.0, 1.0, n)
    head = np.zeros((n, 3))
    prior = rng.normal(0.0, 1.0, (n, 3))
    x = rng.normal(0.0, 1.0, (n, dim))
    z = prior + (1 - gate)[:, None] * (x @ true_w.T)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    y = np.array([rng.choice(3, p=row / row.sum()) for row in p])
    shift = fit_style_shift(gate, head, prior, y, l2=0.0, x=x, embedding_l2=1e-6)
    assert shift.embedding_weight is not None
    assert shift.embedding_weight == pytest.approx(true_w, abs=0.15)
    assert fit_style_shift(gate, head, prior, y, l2=0.0, x=x).embedding_weight is None
    # a strong penalty keeps the term near zero
    strong = fit_style_shift(gate, head, prior, y, l2=0.0, x=x, embedding_l2=100.0)
    assert strong.embedding_weight is not None and np.abs(strong.embedding_weight).max() < 0.01
    with pytest.raises(ValueError, match="embedding term needs embeddings for the 20000"):
        fit_style_shift(gate, head, prior, y, embedding_l2=1e-3)
    with pytest.raises(ValueError, match="style_shift_embedding_l2 must be > 0"):
        fit_style_shift(gate, head, prior, y, x=x, embedding_l2=0.0)


def test_sample_weights_count_as_repeated_requests() -> None:
    rng = np.random.default_rng(2)
    n = 300
    gate, head = rng.uniform(0.0, 1.0, n), rng.normal(0.0, 1.0, (n, 3))
    prior, x = rng.normal(0.0, 1.0, (n, 3)), rng.normal(0.0, 1.0, (n, 4))
    y = rng.integers(0, 3, n)
    weight = rng.integers(1, 4, n)  # 1, 2 or 3 copies
    rows = np.repeat(np.arange(n), weight)
    fit = {"l2": 0.01, "embedding_l2": 0.01}
    weighted = fit_style_shift(gate, head, prior, y, x=x, sample_weight=weight, **fit)
    repeated = fit_style_shift(gate[rows], head[rows], prior[rows], y[rows], x=x[rows], **fit)
    assert weighted.embedding_weight is not None and repeated.embedding_weight is not None
    assert weighted.embedding_weight == pytest.approx(repeated.embedding_weight, abs=1e-4)
    assert weighted.bias == pytest.approx(repeated.bias, abs=1e-4)
    with pytest.raises(ValueError, match="needs 300 weights >= 0 with a positive sum"):
        fit_style_shift(gate, head, prior, y, sample_weight=-weight)


def test_each_training_label_weighs_at_most_the_cap() -> None:
    y = np.array([0] * 3 + [1] * 10 + [2] * 40)
    w = style_shift_train_weights(y, 4, cap=10.0)
    assert w[y == 0].tolist() == [1.0] * 3  # fewer than the cap: one request each
    assert w[y == 1].sum() == pytest.approx(10.0) and w[y == 2].sum() == pytest.approx(10.0)
    assert w[y == 2] == pytest.approx(np.full(40, 0.25))
    assert style_shift_train_weights(y, 4, None).tolist() == [1.0] * len(y)
    with pytest.raises(ValueError, match="style_shift_train_weight must be > 0"):
        style_shift_train_weights(y, 4, 0.0)


def test_a_style_request_of_weight_two_counts_as_two(hashing_encoder: HashingEncoder) -> None:
    x_style, y_style = rotated_style_set(hashing_encoder)
    fit = {"head_gate": (0.1, 0.5), "style_shift_embedding_l2": 0.01}
    twice = fit_toy_router(
        hashing_encoder,
        np.concatenate([x_style, x_style[:10]]),
        np.r_[y_style, y_style[:10]],
        **fit,
    )
    weighted = fit_toy_router(
        hashing_encoder, x_style, y_style, style_weight=np.r_[[2.0] * 10, [1.0] * 50], **fit
    )
    plain = fit_toy_router(hashing_encoder, x_style, y_style, **fit)
    assert twice.style_shift is not None and weighted.style_shift is not None
    assert plain.style_shift is not None
    assert np.allclose(weighted.style_shift.prior_mix, twice.style_shift.prior_mix, atol=1e-4)
    assert not np.allclose(weighted.style_shift.prior_mix, plain.style_shift.prior_mix, atol=1e-3)
    with pytest.raises(ValueError, match=r"style_weight has shape \(3,\) for 60 requests"):
        fit_toy_router(hashing_encoder, x_style, y_style, style_weight=np.ones(3), **fit)


@pytest.mark.parametrize("embedding_l2", [None, 0.01])
def test_router_with_a_style_shift_keeps_the_open_gate_rows_and_saves_it(
    tmp_path: Path, hashing_encoder: HashingEncoder, embedding_l2: float | None
) -> None:
    x_val, _ = toy_split(hashing_encoder, 20, seed=1)
    x_style, y_style = rotated_style_set(hashing_encoder)
    plain = fit_toy_router(hashing_encoder, head_gate=(0.1, 0.5))
    shifted = fit_toy_router(
        hashing_encoder,
        x_style,
        y_style,
        head_gate=(0.1, 0.5),
        style_shift_embedding_l2=embedding_l2,
    )
    assert plain.style_shift is None and shifted.style_shift is not None
    has_term = shifted.style_shift.embedding_weight is not None
    assert has_term == (embedding_l2 is not None)
    gate = shifted.head_gate
    assert gate is not None
    open_rows = x_val[gate.weights(x_val) == 1.0]
    assert len(open_rows) and np.allclose(shifted.logits(open_rows), plain.logits(open_rows))
    # where the gate is not open, the logits move toward the rotated labels
    w = gate.weights(x_style)
    off = x_style[w < 1.0]
    assert len(off)

    def hits(r: Router) -> int:
        return int((r.logits(off).argmax(axis=1) == y_style[w < 1.0]).sum())

    assert hits(shifted) > hits(plain)

    shifted.save(tmp_path / "shifted")
    plain.save(tmp_path / "plain")
    saved = json.loads((tmp_path / "shifted" / "router.json").read_text())
    assert saved["style_shift"] == {"head_scale": shifted.style_shift.head_scale}
    assert "style_shift" not in json.loads((tmp_path / "plain" / "router.json").read_text())
    loaded = Router.load(tmp_path / "shifted")
    assert loaded.style_shift is not None
    assert np.array_equal(loaded.style_shift.prior_mix, shifted.style_shift.prior_mix)
    if has_term:
        assert loaded.style_shift.embedding_weight is not None
        assert np.array_equal(
            loaded.style_shift.embedding_weight, shifted.style_shift.embedding_weight
        )
    else:
        assert loaded.style_shift.embedding_weight is None
    texts = [*QUESTIONS.values(), "holiday court"]
    assert [d.probs for d in loaded.route_batch(texts)] == [
        d.probs for d in shifted.route_batch(texts)
    ]
    assert Router.load(tmp_path / "plain").style_shift is None


def test_without_recalibration_the_router_keeps_its_temperature_and_thresholds(
    hashing_encoder: HashingEncoder,
) -> None:
    x_style, y_style = rotated_style_set(hashing_encoder)
    plain = fit_toy_router(hashing_encoder, head_gate=(0.1, 0.5))
    kept = fit_toy_router(hashing_encoder, x_style, y_style, head_gate=(0.1, 0.5))
    refit = fit_toy_router(
        hashing_encoder, x_style, y_style, head_gate=(0.1, 0.5), style_shift_recalibrate=True
    )
    assert kept.style_shift is not None and refit.style_shift is not None
    assert (kept.temperature, kept.thresholds) == (plain.temperature, plain.thresholds)
    assert refit.temperature != plain.temperature

    # fitted at the kept temperature: its probabilities fit the style set's labels better
    def nll(r: Router) -> float:
        p = r.scores(x_style).probs[np.arange(len(y_style)), y_style]
        return float(-np.log(p).mean())

    assert nll(kept) < nll(plain)


def test_a_style_shift_needs_the_head_gate_and_the_prior(hashing_encoder: HashingEncoder) -> None:
    x_style, y_style = rotated_style_set(hashing_encoder)
    with pytest.raises(ValueError, match="needs the head gate and the description prior"):
        fit_toy_router(hashing_encoder, x_style, y_style)
    gated = fit_toy_router(hashing_encoder, head_gate=(0.1, 0.5))
    shift = StyleShift(np.zeros((4, 4)), np.zeros(4), 0.0)
    with pytest.raises(ValueError, match="needs a head gate and a description prior"):
        Router(encoder=gated.encoder, labels=LABELS, head=gated.head, style_shift=shift)
    # an embedding term must read the encoder's embedding
    wrong_dim = StyleShift(np.zeros((4, 4)), np.zeros(4), 0.0, np.zeros((4, gated.encoder.dim + 1)))
    with pytest.raises(ValueError, match=r"embedding term reads \d+ columns, the encoder gives"):
        dataclasses.replace(gated, style_shift=wrong_dim)


def test_off_style_training_texts_of_named_labels_join_therotated_style_set(
    hashing_encoder: HashingEncoder,
) -> None:
    r = fit_toy_router(hashing_encoder, head_gate=(0.1, 0.5))
    assert r.head_gate is not None
    x_train, y_train = toy_split(hashing_encoder, 60, seed=0)
    w = r.head_gate.weights(x_train)
    law, code = LABELS.index("law"), LABELS.index("code")
    rows = off_style_rows(r.head_gate, x_train, y_train, LABELS, ["law", "code"])
    assert rows.sum() == ((w < 1.0) & np.isin(y_train, [law, code])).sum() > 0
    assert set(y_train[rows]) <= {law, code} and (w[rows] < 1.0).all()
    assert not off_style_rows(r.head_gate, x_train, y_train, LABELS, []).any()
    with pytest.raises(ValueError, match=r"\['surgery'\] are not among labels"):
        off_style_rows(r.head_gate, x_train, y_train, LABELS, ["surgery"])
    # with them the shift is fitted on more requests, and comes out otherwise
    x_style, y_style = rotated_style_set(hashing_encoder)
    alone = fit_toy_router(hashing_encoder, x_style, y_style, head_gate=(0.1, 0.5))
    joined = fit_toy_router(
        hashing_encoder,
        x_style,
        y_style,
        head_gate=(0.1, 0.5),
        style_shift_train_labels=("law", "code"),
    )
    assert alone.style_shift is not None and joined.style_shift is not None
    assert not np.allclose(alone.style_shift.prior_mix, joined.style_shift.prior_mix)
