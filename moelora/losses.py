"""Auxiliary gate losses and usage statistics over stacked per-layer routings.

Shapes: L = wrapped layers, N = (non-padding) tokens, S = slots (E experts, then "no expert").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moelora.config import AuxLossConfig


@dataclass
class GateTrace:
    """Routings of every wrapped layer for one batch, flattened over tokens.

    logits / probs / weights [L, T, S]; selected [L, T, S] bool (top-k choice, or the arg-max
    when the gate is dense). T = batch * sequence.
    """

    logits: torch.Tensor
    probs: torch.Tensor
    weights: torch.Tensor
    selected: torch.Tensor

    def masked(self, token_mask: torch.Tensor | None) -> GateTrace:
        """Keep only tokens where token_mask [T] (or [B, S]) is true, e.g. non-padding."""
        if token_mask is None:
            return self
        keep = token_mask.reshape(-1).bool().to(self.probs.device)
        if keep.shape[0] != self.probs.shape[1]:
            raise ValueError(
                f"token mask has {keep.shape[0]} tokens, trace has {self.probs.shape[1]}"
            )
        return GateTrace(
            self.logits[:, keep], self.probs[:, keep], self.weights[:, keep], self.selected[:, keep]
        )


@dataclass
class AuxLosses:
    load_balance: torch.Tensor
    entropy: torch.Tensor
    z_loss: torch.Tensor
    total: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        return {
            "load_balance": float(self.load_balance.detach()),
            "entropy": float(self.entropy.detach()),
            "z_loss": float(self.z_loss.detach()),
            "total": float(self.total.detach()),
        }


def load_balance_loss(trace: GateTrace, num_experts: int) -> torch.Tensor:
    """Switch/Mixtral loss E * sum_e f_e * P_e per layer, averaged over layers.

    f_e: share of the (top-k or arg-max) selections that went to expert e; P_e: share of the gate
    probability mass on expert e. Both are taken over the real experts only, so the "no expert"
    slot is neither rewarded nor punished. Equals 1 for perfectly balanced routing.
    """
    selected = trace.selected[..., :num_experts].float()
    probs = trace.probs[..., :num_experts]
    dispatch = selected.sum(1) / selected.sum((1, 2)).clamp_min(1.0)[:, None]  # [L, E]
    mass = probs.mean(1)
    mass = mass / mass.sum(-1, keepdim=True).clamp_min(1e-9)
    return num_experts * (dispatch * mass).sum(-1).mean()


def entropy_loss(trace: GateTrace) -> torch.Tensor:
    """Mean per-token entropy of the gate distribution (nats)."""
    probs = trace.probs
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()


def z_loss(trace: GateTrace) -> torch.Tensor:
    """ST-MoE router z-loss: mean logsumexp(logits)^2."""
    return torch.logsumexp(trace.logits.float(), dim=-1).pow(2).mean()


def aux_losses(trace: GateTrace, num_experts: int, config: AuxLossConfig) -> AuxLosses:
    """All auxiliary terms and their weighted sum."""
    if trace.probs.shape[1] == 0:
        zero = trace.probs.sum() * 0.0
        return AuxLosses(zero, zero, zero, zero)
    balance = load_balance_loss(trace, num_experts)
    entropy = entropy_loss(trace)
    zl = z_loss(trace)
    total = config.load_balance * balance + config.entropy * entropy + config.z_loss * zl
    return AuxLosses(balance, entropy, zl, total)


def expert_usage(
    trace: GateTrace, group_ids: torch.Tensor, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums of applied gate weights per layer, group and slot, and token counts per group.

    group_ids [T] (e.g. the domain of each token's example; negative = ignore, e.g. padding).
    Returns (weight_sums [L, num_groups, S], token_counts [num_groups]); divide for mean usage.
    Sums (not means) so that batches accumulate exactly.
    """
    ids = group_ids.reshape(-1).to(trace.weights.device)
    keep = ids >= 0
    weights = trace.weights.detach().float()[:, keep]  # [L, N, S]
    ids = ids[keep]
    sums = weights.new_zeros(weights.shape[0], num_groups, weights.shape[-1]).index_add(
        1, ids, weights
    )
    counts = torch.bincount(ids, minlength=num_groups).to(weights.dtype)
    return sums, counts
