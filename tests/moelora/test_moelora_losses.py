"""Routing rule, auxiliary losses and usage statistics on hand-made numbers."""

from __future__ import annotations

import math

import pytest
import torch

from moelora import (
    AuxLossConfig,
    GateConfig,
    GateTrace,
    MoELoraConfig,
    aux_losses,
    expert_usage,
    route,
)


def trace_from_probs(probs: torch.Tensor, top_k: int | None = None) -> GateTrace:
    """probs [L, T, S] -> a trace whose logits are log(probs)."""
    logits = probs.log()
    if top_k is None:
        selected = torch.nn.functional.one_hot(probs.argmax(-1), probs.shape[-1]).bool()
    else:
        selected = torch.zeros_like(probs, dtype=torch.bool).scatter(
            -1, probs.topk(top_k, -1).indices, True
        )
    return GateTrace(logits, probs, probs, selected)


def test_route_topk_renormalises_and_zeroes_the_rest() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    routing = route(logits, GateConfig(top_k=2, temperature=0.5), training=False)
    probs = torch.softmax(logits / 0.5, -1)
    torch.testing.assert_close(routing.probs, probs)
    expected = torch.zeros(1, 4)
    expected[0, :2] = probs[0, :2] / probs[0, :2].sum()
    torch.testing.assert_close(routing.weights, expected)
    assert routing.top_index is not None and routing.top_index.tolist() == [[0, 1]]


def test_load_balance_is_one_when_balanced_and_num_experts_when_collapsed() -> None:
    balanced = torch.eye(3).repeat(2, 1)[None] * 0.97 + 0.01  # each expert wins 2 of 6 tokens
    assert aux_losses(trace_from_probs(balanced), 3, AuxLossConfig()).load_balance.item() == (
        pytest.approx(1.0)
    )
    collapsed = torch.tensor([0.98, 0.01, 0.01]).expand(1, 6, 3)
    value = aux_losses(trace_from_probs(collapsed), 3, AuxLossConfig()).load_balance.item()
    assert value == pytest.approx(3 * 0.98)


def test_load_balance_ignores_the_null_slot() -> None:
    # Tokens split evenly over 2 experts, plus mass on the "no expert" slot: still balanced.
    probs = torch.tensor([[0.6, 0.1, 0.3], [0.1, 0.6, 0.3]]).repeat(3, 1)[None]
    value = aux_losses(trace_from_probs(probs), 2, AuxLossConfig()).load_balance.item()
    assert value == pytest.approx(1.0)


def test_entropy_and_z_loss_values_and_weighted_total() -> None:
    uniform = torch.full((2, 5, 4), 0.25)
    config = AuxLossConfig(load_balance=0.5, entropy=0.25, z_loss=2.0)
    losses = aux_losses(trace_from_probs(uniform, top_k=2), 4, config)
    assert losses.entropy.item() == pytest.approx(math.log(4))
    assert losses.z_loss.item() == pytest.approx(0.0, abs=1e-6)  # logsumexp(log p) = 0
    expected = 0.5 * losses.load_balance + 0.25 * losses.entropy + 2.0 * losses.z_loss
    assert losses.total.item() == pytest.approx(expected.item())
    assert set(losses.as_floats()) == {"load_balance", "entropy", "z_loss", "total"}


def test_masking_drops_padding_tokens() -> None:
    probs = torch.tensor([[[0.9, 0.1], [0.1, 0.9], [0.5, 0.5]]])
    trace = trace_from_probs(probs).masked(torch.tensor([[True, True, False]]))
    assert trace.probs.shape == (1, 2, 2)
    with pytest.raises(ValueError, match=r"token mask has 2 tokens"):
        trace_from_probs(probs).masked(torch.tensor([True, False]))


def test_expert_usage_sums_per_layer_and_group() -> None:
    weights = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.2, 0.8]]]).repeat(2, 1, 1)
    weights[1] = weights[1].flip(-1)  # second layer mirrors the first
    trace = GateTrace(weights, weights, weights, weights > 0)
    sums, counts = expert_usage(trace, torch.tensor([0, 1, 1, -1]), 2)
    torch.testing.assert_close(counts, torch.tensor([1.0, 2.0]))
    first = torch.tensor([[1.0, 0.0], [0.25, 0.75]])
    torch.testing.assert_close(sums / counts[:, None], torch.stack([first, first.flip(-1)]))


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"gate.temperature must be > 0"):
        GateConfig(temperature=0)
    with pytest.raises(ValueError, match=r"compute_path='topk' needs gate.top_k"):
        MoELoraConfig(compute_path="topk")
    with pytest.raises(ValueError, match=r"moelora.gate: unknown key\(s\) \['topk'\]"):
        MoELoraConfig.from_dict({"gate": {"topk": 2}})
    config = MoELoraConfig.from_dict({"gate": {"top_k": 2}, "compute_path": "topk"})
    assert MoELoraConfig.from_dict(config.to_dict()) == config
