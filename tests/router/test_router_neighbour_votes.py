"""The style shift's neighbour term: label votes of a request's most similar exam-style requests."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.special import log_softmax
from tests_router_helpers import QUESTIONS, fit_toy_router, rotated_style_set

from router import HashingEncoder, Router
from router.classifier import NeighbourVotes, StyleShift
from router.fitting import FitConfig, fit_style_shift

# three unit examples in 2-d: label 0 at (1, 0), label 1 at (0, 1) and (0.6, 0.8)
EXAMPLES = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=np.float32)
EXAMPLE_LABELS = np.array([0, 1, 1])


def test_votes_worked_by_hand() -> None:
    nb = NeighbourVotes(EXAMPLES, EXAMPLE_LABELS, n_labels=3, k=2, temperature=1.0)
    query = np.array([[1.0, 0.0]], dtype=np.float32)
    # the two nearest: cosine 1.0 (label 0) and 0.6 (label 1), weights softmax([1.0, 0.6])
    w0 = 1.0 / (1.0 + math.exp(-0.4))
    assert nb.votes(query)[0] == pytest.approx([w0, 1.0 - w0, 0.0], abs=1e-6)
    # its own group's example does not vote: cosine 0.6 and 0.0, both label 1
    own = nb.votes(query, np.array(["a"]), np.array(["a", "b", "b"]))
    assert own[0] == pytest.approx([0.0, 1.0, 0.0], abs=1e-6)
    # a cold temperature: the nearest alone
    cold = dataclasses.replace(nb, temperature=1e-3)
    assert cold.votes(np.array([[0.0, 1.0]], dtype=np.float32))[0] == pytest.approx([0, 1, 0])
    many = nb.votes(np.random.default_rng(0).normal(size=(5, 2)).astype(np.float32))
    assert many.sum(axis=1) == pytest.approx(np.ones(5), abs=1e-6)


def test_votes_refuse_bad_settings() -> None:
    with pytest.raises(ValueError, match=r"1 <= k <= 3 examples, got k=4"):
        NeighbourVotes(EXAMPLES, EXAMPLE_LABELS, 3, k=4, temperature=1.0)
    with pytest.raises(ValueError, match="temperature > 0"):
        NeighbourVotes(EXAMPLES, EXAMPLE_LABELS, 3, k=1, temperature=0.0)
    with pytest.raises(ValueError, match=r"label ids must lie in \[0, 1\)"):
        NeighbourVotes(EXAMPLES, EXAMPLE_LABELS, 1, k=1, temperature=1.0)
    with pytest.raises(ValueError, match=r"embeddings \(m, dim\) and label ids \(m,\)"):
        NeighbourVotes(EXAMPLES, EXAMPLE_LABELS[:2], 3, k=1, temperature=1.0)
    nb = NeighbourVotes(EXAMPLES, EXAMPLE_LABELS, 3, k=1, temperature=1.0)
    with pytest.raises(ValueError, match="holds every example"):
        nb.votes(EXAMPLES[:1], np.array(["a"]), np.array(["a", "a", "a"]))
    with pytest.raises(ValueError, match="needs k >= 1, style_shift_embedding_l2"):
        FitConfig(style_shift_neighbours=10)


def test_vote_term_worked_by_hand() -> None:
    nb = NeighbourVotes(EXAMPLES, EXAMPLE_LABELS, n_labels=2, k=1, temperature=1.0)
    vote_weight = np.array([[2.0, 0.0], [0.0, -1.0]])
    shift = StyleShift(np.zeros((2, 2)), np.zeros(2), 0.0, None, vote_weight, nb)
    gate = np.array([1.0, 0.5])
    head = np.zeros((2, 2))
    prior = np.ones((2, 2))
    votes = np.array([[1.0, 0.0], [0.25, 0.75]])
    # g = 1: the prior alone; g = 0.5: prior + 0.5 * [2 * 0.25, -0.75]
    assert shift.logits(gate, head, prior, votes=votes).tolist() == [[1.0, 1.0], [1.25, 0.625]]
    with pytest.raises(ValueError, match=r"needs votes \(2, 2\), got None"):
        shift.logits(gate, head, prior)
    with pytest.raises(ValueError, match="vote_weight and neighbours together"):
        StyleShift(np.zeros((2, 2)), np.zeros(2), 0.0, None, vote_weight)
    with pytest.raises(ValueError, match=r"vote_weight needs shape \(2, 2\)"):
        StyleShift(np.zeros((2, 2)), np.zeros(2), 0.0, None, np.zeros((2, 3)), nb)


def test_fit_style_shift_learns_from_the_votes() -> None:
    # Labels drawn from softmax(prior + u * votes @ V.T): with the vote term the fit gets back the
    # generating model's likelihood; the embedding term alone (on pure noise) cannot.
    rng = np.random.default_rng(0)
    n, k = 6000, 3
    gate = rng.uniform(0.0, 1.0, n)
    head = np.zeros((n, k))
    prior = rng.normal(0.0, 0.5, (n, k))
    votes = rng.dirichlet(np.ones(k) * 0.3, n)
    true_v = 3.0 * np.eye(k)
    x = rng.normal(0.0, 1.0, (n, 4))
    z = prior + (1 - gate)[:, None] * (votes @ true_v.T)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    y = np.array([rng.choice(k, p=row / row.sum()) for row in p])

    def nll(logits: np.ndarray) -> float:
        return float(-log_softmax(logits, axis=1)[np.arange(n), y].mean())

    nb = NeighbourVotes(rng.normal(size=(5, 4)).astype(np.float32), np.arange(5) % k, k, 1, 0.1)
    with_votes = fit_style_shift(
        gate, head, prior, y, 0.0, x=x, embedding_l2=1e-6, neighbours=nb, votes=votes
    )
    without = fit_style_shift(gate, head, prior, y, 0.0, x=x, embedding_l2=1e-6)
    assert with_votes.vote_weight is not None and with_votes.neighbours is nb
    assert with_votes.embedding_weight is not None and with_votes.embedding_weight.shape == (k, 4)
    fitted = nll(with_votes.logits(gate, head, prior, x, votes))
    assert fitted == pytest.approx(nll(z), abs=0.01)
    assert fitted < nll(without.logits(gate, head, prior, x)) - 0.1
    with pytest.raises(ValueError, match="a vote term needs the embedding term"):
        fit_style_shift(gate, head, prior, y, neighbours=nb, votes=votes)


def test_router_with_neighbour_votes_saves_and_loads_them(
    tmp_path: Path, hashing_encoder: HashingEncoder
) -> None:
    x_style, y_style = rotated_style_set(hashing_encoder)
    groups = [f"check{i % 3}" for i in range(len(y_style))]
    fit = {"head_gate": (0.1, 0.5), "style_shift_embedding_l2": 0.01}
    plain = fit_toy_router(hashing_encoder, x_style, y_style, groups, **fit)
    voted = fit_toy_router(
        hashing_encoder, x_style, y_style, groups, style_shift_neighbours=5, **fit
    )
    shift = voted.style_shift
    assert shift is not None and shift.neighbours is not None and shift.vote_weight is not None
    assert shift.neighbours.k == 5 and len(shift.neighbours.embeddings) == len(y_style)
    assert np.array_equal(shift.neighbours.label_index, y_style)
    # the votes point at the rotated labels, so the term raises the logit of the label voted for
    assert np.diag(shift.vote_weight).mean() > np.abs(shift.vote_weight).mean()
    gate = voted.head_gate
    assert gate is not None
    off = gate.weights(x_style) < 1.0
    assert off.any()

    def hits(r: Router) -> int:
        return int((r.logits(x_style[off]).argmax(axis=1) == y_style[off]).sum())

    assert hits(voted) >= hits(plain)

    voted.save(tmp_path / "voted")
    saved = json.loads((tmp_path / "voted" / "router.json").read_text())
    assert saved["style_shift"]["neighbours"] == {"k": 5, "temperature": 0.05}
    loaded = Router.load(tmp_path / "voted")
    assert loaded.style_shift is not None and loaded.style_shift.neighbours is not None
    assert np.array_equal(loaded.style_shift.neighbours.embeddings, shift.neighbours.embeddings)
    texts = [*QUESTIONS.values(), "holiday court"]
    assert [d.probs for d in loaded.route_batch(texts)] == [
        d.probs for d in voted.route_batch(texts)
    ]
    # neighbours whose width is not the router's similarity columns are refused
    wide = dataclasses.replace(
        shift.neighbours, embeddings=np.zeros((len(y_style), hashing_encoder.dim + 1), np.float32)
    )
    with pytest.raises(ValueError, match="neighbours have 257 columns"):
        dataclasses.replace(voted, style_shift=dataclasses.replace(shift, neighbours=wide))
    with pytest.raises(ValueError, match="style_groups has 3 entries for 60 requests"):
        fit_toy_router(hashing_encoder, x_style, y_style, groups[:3], **fit)


def test_votes_of_many_requests_are_each_requests_own() -> None:
    # more rows than one chunk: the same votes as one request at a time, groups included
    rng = np.random.default_rng(1)
    examples = rng.normal(size=(40, 8)).astype(np.float32)
    examples /= np.linalg.norm(examples, axis=1, keepdims=True)
    nb = NeighbourVotes(examples, rng.integers(0, 3, 40), 3, k=5, temperature=0.1)
    x = rng.normal(size=(2500, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    groups, example_groups = rng.integers(0, 4, 2500), np.arange(40) % 4
    together = nb.votes(x, groups, example_groups)
    for i in (0, 1023, 1024, 2499):
        alone = nb.votes(x[i : i + 1], groups[i : i + 1], example_groups)
        assert together[i] == pytest.approx(alone[0], abs=1e-6)
