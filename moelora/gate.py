"""The gating network and the routing rule (softmax with temperature, top-k, noise)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moelora.config import GateConfig


class Gate(nn.Module):
    """Maps a layer's input to one logit per slot (experts, then the optional "no expert").

    linear: proj (in -> slots). mlp: proj (in -> hidden), SiLU, head (hidden -> slots).
    With normalize_input the input is RMS-normalised first; that is applied after the matmul as a
    per-token scale, W (x / rms(x)) = (W x) / rms(x), so x is read once more, not rewritten.
    Shapes: x [T, in_features] -> logits [T, num_slots].
    """

    def __init__(self, in_features: int, num_slots: int, config: GateConfig) -> None:
        super().__init__()
        self.in_features = in_features
        self.num_slots = num_slots
        self.normalize_input = config.normalize_input
        self.scale = in_features**0.5  # W (x / rms(x)) = (W x) * sqrt(in) / ||x||
        mlp = config.kind == "mlp"
        self.proj = nn.Linear(in_features, config.hidden_size if mlp else num_slots)
        self.head = (
            nn.Sequential(nn.SiLU(), nn.Linear(config.hidden_size, num_slots)) if mlp else None
        )
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=config.init_std)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        proj = self.proj
        weight = proj.weight
        # The gate may be kept in float32 over a bfloat16 model; run it in its own dtype.
        if x.dtype != weight.dtype:
            x = x.to(weight.dtype)
        if weight.shape[0] < 16 and x.ndim == 2 and x.device.type == "cpu":
            # A few slots: (W xᵀ)ᵀ is ~1.5x faster on CPU than x Wᵀ, whose N (= S) is too thin
            # for the GEMM kernels (measured at 128 x 576 tokens: 14 vs 22 us). Not on CUDA,
            # where the transposed result costs the softmax one more kernel (a contiguous copy).
            projected = torch.mm(weight, x.t()).t()  # [T, S]
        else:
            projected = F.linear(x, weight)  # [T, P]
        if self.normalize_input:
            norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-6)  # [T, 1]
            hidden = torch.addcdiv(proj.bias, projected, norm, value=self.scale)
        else:
            hidden = projected + proj.bias
        return hidden if self.head is None else self.head(hidden)

    def slot_parameter_names(self) -> tuple[str, str]:
        """The state-dict names of the weight [S, ·] and bias [S] whose rows are the slots."""
        return (
            ("proj.weight", "proj.bias") if self.head is None else ("head.1.weight", "head.1.bias")
        )


@dataclass
class Routing:
    """Per-token routing of one layer. T = tokens, S = slots, k = top_k.

    logits [T, S] (before noise), probs [T, S] (softmax over all slots, float32),
    weights [T, S] (what is applied: probs, or the renormalised top-k with zeros elsewhere),
    top_index / top_weight [T, k] when top-k is on, else None.
    """

    logits: torch.Tensor
    probs: torch.Tensor
    weights: torch.Tensor
    top_index: torch.Tensor | None
    top_weight: torch.Tensor | None


def route(
    logits: torch.Tensor,
    config: GateConfig,
    training: bool,
    bias: torch.Tensor | None = None,
) -> Routing:
    """Turn gate logits [..., S] into routing weights (float32).

    bias (broadcastable to logits, e.g. [B, 1, S] over [B, T, S]) is added after the temperature:
    a per-row prior in log space, probs ∝ exp(bias) · softmax(logits / T).
    """
    noisy = logits if logits.dtype == torch.float32 else logits.float()
    if training and config.noise_std > 0:
        noisy = noisy + torch.randn_like(noisy) * config.noise_std
    if config.temperature != 1.0:
        noisy = noisy / config.temperature
    if bias is not None:
        noisy = noisy + bias
    probs = torch.softmax(noisy, dim=-1)
    if config.top_k is None:
        return Routing(logits, probs, probs, None, None)
    k = min(config.top_k, probs.shape[-1])
    top_weight, top_index = probs.topk(k, dim=-1)
    top_weight = top_weight / top_weight.sum(-1, keepdim=True)
    weights = torch.zeros_like(probs).scatter(-1, top_index, top_weight)
    return Routing(logits, probs, weights, top_index, top_weight)
