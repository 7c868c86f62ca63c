"""Fitting heads, priors and prototypes; encoders and their specs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tests_router_helpers import QUESTIONS, fit_toy_router, toy_split

from router import EncoderSpec, HashingEncoder, Router, build_encoder
from router.classifier import (
    DescriptionPrior,
    HeadGate,
    LinearHead,
    fit_head,
    head_from_tensors,
)
from router.fitting import FitConfig, fit_router, ood_prototypes


def test_hashing_encoder_is_deterministic_unit_norm_and_truncates() -> None:
    enc = HashingEncoder()
    a = enc.encode(["court statute", "court statute", ""])
    assert a.shape == (3, 256) and a.dtype == np.float32
    assert np.array_equal(a[0], a[1])
    assert np.linalg.norm(a[0]) == pytest.approx(1.0) and not a[2].any()
    long = enc.encode(["court " * 10 + "patient " * 10_000])[0]
    assert np.array_equal(long, enc.encode(["court " * 10 + "patient " * 246])[0])  # 256 words


def test_encoder_spec_validation() -> None:
    with pytest.raises(ValueError, match="unknown encoder setting"):
        EncoderSpec.from_dict({"name": "minilm", "pooling": "cls"})
    with pytest.raises(ValueError, match="unknown encoder kind"):
        build_encoder({"kind": "onnx"})
    assert isinstance(build_encoder({"kind": "hashing", "name": "h", "dim": 64}), HashingEncoder)


def test_linear_head_logits_and_tensor_round_trip() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(int) + 2 * (x[:, 1] > 0)
    head = fit_head(x, y, 4, c=10.0)
    assert isinstance(head, LinearHead)
    assert (head.logits(x).argmax(1) == y).mean() > 0.9
    again = head_from_tensors(head.config(), head.tensors())
    assert np.array_equal(again.logits(x), head.logits(x))


def test_mlp_head_round_trip_and_router_save(
    tmp_path: Path, hashing_encoder: HashingEncoder
) -> None:
    x, y = toy_split(hashing_encoder, 40, seed=0)
    xv, yv = toy_split(hashing_encoder, 10, seed=1)
    r = fit_router(
        hashing_encoder,
        ("law", "code", "medical", "base"),
        x,
        y,
        xv,
        yv,
        config=FitConfig(head="mlp", hidden=(16,), max_iter=200, prototypes_per_label=0),
    )
    assert r.head.kind == "mlp" and r.prototypes is None and r.prior is None
    r.save(tmp_path / "mlp")
    loaded = Router.load(tmp_path / "mlp")
    texts = list(QUESTIONS.values())
    assert [d.probs for d in loaded.route_batch(texts)] == [d.probs for d in r.route_batch(texts)]


def test_fit_head_needs_every_label() -> None:
    x = np.eye(4, dtype=np.float32)
    with pytest.raises(ValueError, match="cover"):
        fit_head(x, np.array([0, 1, 1, 0]), 3)
    with pytest.raises(ValueError, match="unknown head kind"):
        fit_head(x, np.array([0, 1, 2, 0]), 3, kind="svm")


def test_description_prior_takes_the_best_description_per_label() -> None:
    emb = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32)
    prior = DescriptionPrior(emb, np.array([0, 0, 1]), n_labels=3, scale=10.0)
    x = np.array([[0.6, 0.8, 0.0]], dtype=np.float32)
    assert prior.similarities(x)[0].tolist() == pytest.approx([0.8, 0.0, -1.0])
    assert prior.logits(x)[0].tolist() == pytest.approx([8.0, 0.0, -10.0])


def test_ood_prototypes_are_unit_rows_per_label() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = np.repeat([0, 1, 2], 20)
    p = ood_prototypes(x, y, 3, per_label=4)
    assert p.shape == (12, 5)
    assert np.allclose(np.linalg.norm(p, axis=1), 1.0, atol=1e-5)
    assert ood_prototypes(x[:6], np.array([0, 0, 1, 1, 2, 2]), 3, per_label=4).shape == (6, 5)


def test_head_gate_weight_rises_linearly_between_low_and_high() -> None:
    gate = HeadGate(np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32), low=0.2, high=0.6)
    # best cosine to the two prototypes: 0.1, 0.4, 0.6, 0.8 (the second row's best is its y)
    x = np.array([[0.1, -0.995], [0.4, 0.3], [-0.8, 0.6], [0.8, 0.6]], dtype=np.float32)
    assert gate.weights(x).tolist() == pytest.approx([0.0, 0.5, 1.0, 1.0])
    with pytest.raises(ValueError, match="high > low"):
        HeadGate(np.eye(2, dtype=np.float32), low=0.5, high=0.5)
    with pytest.raises(ValueError, match="quantiles need 0 <= low < high <= 1"):
        FitConfig(head_gate=(0.3, 0.2))
    with pytest.raises(ValueError, match="prototypes_per_label > 0"):
        FitConfig(head_gate=(0.1, 0.5), prototypes_per_label=0)


def test_gated_router_lets_the_prior_alone_decide_far_from_the_training_data(
    tmp_path: Path, hashing_encoder: HashingEncoder
) -> None:
    r = fit_toy_router(hashing_encoder, head_gate=(0.1, 0.5))
    gate = r.head_gate
    assert gate is not None and r.prior is not None
    # the quantiles are the validation split's: about half of it is weighted fully, a tenth not
    x_val, _ = toy_split(hashing_encoder, 20, seed=1)
    w = gate.weights(x_val)
    assert 0.4 <= (w == 1.0).mean() <= 0.6 and 0.05 <= (w == 0.0).mean() <= 0.15
    ungated = fit_toy_router(hashing_encoder)
    assert np.array_equal(ungated.head.logits(x_val), r.head.logits(x_val))  # same head
    far = x_val[w == 0.0]
    assert np.allclose(r.logits(far), r.prior_weight * r.prior.logits(far))
    near = x_val[w == 1.0]
    assert np.allclose(r.logits(near), ungated.logits(near))
    # saved and loaded: the same decisions; an ungated router's file has no gate at all
    r.save(tmp_path / "gated")
    ungated.save(tmp_path / "ungated")
    loaded = Router.load(tmp_path / "gated")
    texts = [*QUESTIONS.values(), "holiday court"]
    assert [d.probs for d in loaded.route_batch(texts)] == [d.probs for d in r.route_batch(texts)]
    assert loaded.head_gate is not None and (loaded.head_gate.low, loaded.head_gate.high) == (
        gate.low,
        gate.high,
    )
    saved = json.loads((tmp_path / "gated" / "router.json").read_text())
    assert saved["head_gate"] == {"low": gate.low, "high": gate.high}
    assert "head_gate" not in json.loads((tmp_path / "ungated" / "router.json").read_text())
    assert Router.load(tmp_path / "ungated").head_gate is None
