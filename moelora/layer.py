"""MoELoraLinear: a frozen nn.Linear plus a per-token gated mixture of frozen LoRA experts.

    y = base_layer(x) + sum_e w_e(x) * s_e * B_e A_e x

w(x) comes from a gate that reads this layer's own input x, so one forward pass suffices and the
layer works unchanged with a KV cache. Experts are stored stacked and zero-padded to the largest
rank (padding rows/columns add exact zeros), so experts with different ranks share one matmul;
PEFT's scaling s_e = alpha / r is folded into B at build time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moelora.config import ComputePath, GateConfig
from moelora.gate import Gate, Routing, fixed_routing, route


class MoELoraLinear(nn.Module):
    """Replacement for a targeted nn.Linear.

    lora_A [E, r_max, in] and lora_B [out, E, r_max] (holding s_e * B_e) are frozen parameters. B
    is laid out so that its [out, E * r_max] view is free, which makes the dense path two matmuls,
    like a single LoRA of rank E * r_max with per-token weights on its rank groups.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        ranks: tuple[int, ...],
        gate: Gate,
        gate_config: GateConfig,
        compute_path: ComputePath = "dense",
    ) -> None:
        super().__init__()
        num_experts, r_max, in_features = lora_A.shape
        if lora_B.shape != (base_layer.out_features, num_experts, r_max):
            raise ValueError(
                f"lora_B must be [out={base_layer.out_features}, E={num_experts}, r={r_max}], "
                f"got {tuple(lora_B.shape)}"
            )
        if in_features != base_layer.in_features:
            raise ValueError(f"lora_A in={in_features} != base in={base_layer.in_features}")
        if len(ranks) != num_experts:
            raise ValueError(f"need one rank per expert, got {ranks} for {num_experts} experts")
        if gate.num_slots != num_experts + int(gate_config.null_expert):
            raise ValueError(f"gate has {gate.num_slots} slots for {num_experts} experts")
        self.base_layer = base_layer
        self.lora_A = nn.Parameter(lora_A.contiguous(), requires_grad=False)
        self.lora_B = nn.Parameter(lora_B.contiguous(), requires_grad=False)
        self.ranks = ranks
        self.gate = gate
        self.gate_config = gate_config
        self.compute_path: ComputePath = compute_path
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.num_experts = num_experts
        # Set by MoELoraModel: keep the last routing (for aux losses / introspection), and
        # optional fixed slot weights [S] that replace the gate (ablations, tests).
        self.record = False
        self.last_routing: Routing | None = None
        self.fixed_weights: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        flat = x.reshape(-1, self.in_features)
        routing = self.routing(flat)
        if self.record:
            self.last_routing = routing
        if self.compute_path == "topk" and routing.top_index is not None:
            assert routing.top_weight is not None
            delta = self.topk_delta(flat, routing.top_index, routing.top_weight)
            return result + delta.view(result.shape).to(result.dtype)
        weights = routing.weights[:, : self.num_experts]
        return self.add_dense_delta(result.view(-1, self.out_features), flat, weights).view(
            result.shape
        )

    def routing(self, x: torch.Tensor) -> Routing:
        """Routing for tokens x [T, in]."""
        if self.fixed_weights is not None:
            return fixed_routing(self.fixed_weights.to(x.device), x.shape[0], x.dtype)
        return route(self.gate(x), self.gate_config, self.training)

    def add_dense_delta(
        self, result: torch.Tensor, x: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """Add all experts in one batched pass to result [T, out]. x [T, in], weights [T, E]."""
        num_tokens = x.shape[0]
        num_experts, r_max, _ = self.lora_A.shape
        low_rank = F.linear(x.to(self.lora_A.dtype), self.lora_A.view(num_experts * r_max, -1))
        low_rank = (
            low_rank.view(num_tokens, num_experts, r_max) * weights.to(low_rank.dtype)[..., None]
        )
        lora_B = self.lora_B.view(self.out_features, num_experts * r_max)
        # In place: the base linear's backward does not need its output. The casts are no-ops
        # except under autocast over float32 weights.
        low_rank = low_rank.view(num_tokens, -1).to(result.dtype)
        return result.addmm_(low_rank, lora_B.t().to(result.dtype))

    def topk_delta(
        self, x: torch.Tensor, top_index: torch.Tensor, top_weight: torch.Tensor
    ) -> torch.Tensor:
        """Only the selected experts, each on the tokens routed to it.

        x [T, in], top_index / top_weight [T, k] -> [T, out]. Tokens are grouped by expert (one
        argsort), so each expert runs one matmul pair over its own tokens at its own rank; slots
        past the experts ("no expert") are skipped.
        """
        num_tokens, k = top_index.shape
        x = x.to(self.lora_A.dtype)
        flat_index = top_index.reshape(-1)
        order = flat_index.argsort()
        counts = torch.bincount(flat_index, minlength=self.num_experts).tolist()
        pair_weight = top_weight.reshape(-1).to(x.dtype)
        out = x.new_zeros(num_tokens, self.out_features)
        start = 0
        for expert, count in enumerate(counts[: self.num_experts]):
            if count:
                pairs = order[start : start + count]
                tokens = pairs // k
                rank = self.ranks[expert]
                low_rank = F.linear(x.index_select(0, tokens), self.lora_A[expert, :rank])
                y = F.linear(low_rank, self.lora_B[:, expert, :rank])
                out = out.index_add(0, tokens, y * pair_weight[pairs, None])
            start += count
        return out

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, "
            f"ranks={self.ranks}, path={self.compute_path}"
        )
