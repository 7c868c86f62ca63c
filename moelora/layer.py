"""MoELoraLinear: a frozen nn.Linear plus a per-token gated mixture of frozen LoRA experts.

    y = base_layer(x) + sum_e w_e(x) * s_e * B_e A_e x

w(x) comes from a gate that reads this layer's own input x, so one forward pass suffices and the
layer works unchanged with a KV cache. Experts are stored stacked and zero-padded to the largest
rank (padding rows/columns add exact zeros), so experts with different ranks share one matmul;
PEFT's scaling s_e = alpha / r is folded into B at build time.

Per call, a RowRouting (see routing.py) may give some rows fixed weights (one-hot = one adapter,
zeros = the base model, a soft mix) instead of the gate; all rows still share the same two
matmuls, so a mixed batch costs what an all-gate batch costs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moelora.config import ComputePath, GateConfig
from moelora.gate import Gate, Routing, route
from moelora.losses import GateTrace
from moelora.routing import RowTensors, current_scope


class MoELoraLinear(nn.Module):
    """Replacement for a targeted nn.Linear (kept as ``base_layer``, like PEFT's LoRA layer).

    lora_A [E, r_max, in] and lora_B [E, r_max, out] (holding (s_e * B_e)ᵀ) are frozen parameters;
    their [E * r_max, in] / [E * r_max, out] views are free and contiguous, which makes the dense
    path two matmuls, like a single LoRA of rank E * r_max with per-token weights on its rank
    groups. The first ``num_gate_experts`` experts are the ones the gate mixes; experts added
    later (hot-loaded adapters) come after them and get weight 0 from the gate.
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
        num_gate_experts: int | None = None,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.num_gate_experts = lora_A.shape[0] if num_gate_experts is None else num_gate_experts
        if gate.num_slots != self.num_gate_experts + int(gate_config.null_expert):
            raise ValueError(f"gate has {gate.num_slots} slots for {self.num_gate_experts} experts")
        self.gate = gate
        self.gate_config = gate_config
        self.compute_path: ComputePath = compute_path
        # Identifies the owning MoELoraModel's calls (see routing.current_scope); set by it.
        self.owner: object | None = None
        self.set_experts(lora_A, lora_B, ranks)

    def set_experts(
        self, lora_A: torch.Tensor, lora_B: torch.Tensor, ranks: tuple[int, ...]
    ) -> None:
        """Replace the stacked experts (lora_A [E, r, in], lora_B [E, r, out] = scaled Bᵀ)."""
        num_experts, r_max, in_features = lora_A.shape
        if lora_B.shape != (num_experts, r_max, self.out_features):
            raise ValueError(
                f"lora_B must be [E={num_experts}, r={r_max}, out={self.out_features}], "
                f"got {tuple(lora_B.shape)}"
            )
        if in_features != self.in_features:
            raise ValueError(f"lora_A in={in_features} != base in={self.in_features}")
        if len(ranks) != num_experts:
            raise ValueError(f"need one rank per expert, got {ranks} for {num_experts} experts")
        if num_experts < self.num_gate_experts:
            raise ValueError(f"{num_experts} experts, but the gate mixes {self.num_gate_experts}")
        self.lora_A = nn.Parameter(lora_A.contiguous(), requires_grad=False)
        self.lora_B = nn.Parameter(lora_B.contiguous(), requires_grad=False)
        self.ranks = ranks
        self.num_experts = num_experts
        self.r_max = r_max

    def expert_weights(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ``index``'s own A [r, in] and scaled B [out, r] (views, without padding)."""
        rank = self.ranks[index]
        return self.lora_A[index, :rank], self.lora_B[index, :rank].t()

    # -- forward ----------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)  # [*, out]
        scope = current_scope(self.owner)
        flat = x.reshape(-1, self.in_features)  # [N, in], N = B * T
        rows: RowTensors | None = None
        lead: tuple[int, ...] = (flat.shape[0],)  # weights per token: (N,), or (B, T) per row
        if scope is not None and scope.routing is not None:
            batch = scope.routing.batch_size
            if x.ndim < 2 or x.shape[0] != batch:
                raise ValueError(
                    f"{type(self).__name__}: input {tuple(x.shape)} does not have the {batch} "
                    "rows of row_routing"
                )
            rows = scope.rows(x.device, self.lora_A.dtype)
            lead = (batch, flat.shape[0] // batch)
        config = self.gate_config
        if (
            config.top_k is None
            and not (self.training and config.noise_std)
            and (scope is None or scope.recorder is None)
            and (rows is None or rows.bias is None)
        ):  # the common cases: a plain softmax gate (or none), nothing recorded
            if rows is not None and not rows.any_gated:
                weights = rows.fixed  # [B, 1, E]
            else:
                logits = self.gate(flat)  # [N, S], float32
                if config.temperature != 1.0:
                    logits = logits / config.temperature
                weights = self._gate_weights(torch.softmax(logits, dim=-1))  # [N, E]
                if rows is not None:
                    weights = self._mix_rows(weights.view(*lead, -1), rows)  # [B, T, E]
            return self._add_dense(result, flat, weights.unsqueeze(-1), lead)
        routing = None  # None: no row uses the gate in this call, so it is not run
        if rows is None or rows.any_gated:
            logits = self.gate(flat)  # [N, S], float32
            bias = None if rows is None else rows.bias  # [B, 1, S]
            if bias is not None:
                logits = logits.view(*lead, -1)  # [B, T, S]
            routing = route(logits, config, self.training, bias)
        if scope is not None and scope.recorder is not None:
            scope.recorder[id(self)] = self._trace(routing, rows, lead)
        if self.compute_path == "topk" and config.top_k is not None:
            delta = self._topk_delta(flat, routing, rows, lead)  # [N, out]
            return result + delta.view(result.shape).to(result.dtype)
        return self._add_dense(result, flat, self._weights(routing, rows, lead).unsqueeze(-1), lead)

    def _add_dense(
        self,
        result: torch.Tensor,
        x: torch.Tensor,
        weights: torch.Tensor,
        lead: tuple[int, ...],
    ) -> torch.Tensor:
        """The dense path: all experts in two matmuls, their rank groups scaled per token.

        result [*, out] (updated in place), x [N, in], weights [*lead, E, 1] with lead (N,) or
        (B, T|1).
        """
        lora_A = self.lora_A
        if x.dtype != lora_A.dtype:  # autocast over float32 weights
            x = x.to(lora_A.dtype)
        low_rank = F.linear(x, lora_A.view(-1, self.in_features))  # [N, E*r]
        scaled = low_rank.view(*lead, -1, self.r_max) * weights  # [*lead, E, r]
        return self.add_dense_delta(result, scaled.view(x.shape[0], -1))  # [N, E*r]

    def _gate_weights(self, weights: torch.Tensor) -> torch.Tensor:
        """The gate's weights [..., S] over the resident experts, in their dtype: [..., E]."""
        dtype = self.lora_A.dtype
        if weights.shape[-1] != self.num_gate_experts:  # drop the "no expert" slot
            weights = weights[..., : self.num_gate_experts]
        if weights.dtype != dtype:
            weights = weights.to(dtype)
        if self.num_experts > self.num_gate_experts:  # added experts: weight 0 from the gate
            weights = F.pad(weights, (0, self.num_experts - self.num_gate_experts))
        return weights

    def _mix_rows(self, gate: torch.Tensor, rows: RowTensors) -> torch.Tensor:
        """Gated rows keep the gate's weights [B, T, E], the others their fixed ones."""
        if rows.gated is None:  # every row is gated
            return gate
        return torch.where(rows.gated, gate, rows.fixed)  # [B, T, E]

    def _weights(
        self, routing: Routing | None, rows: RowTensors | None, lead: tuple[int, ...]
    ) -> torch.Tensor:
        """Expert weights [*lead, E] in the experts' dtype ([B, 1, E] when no row is gated)."""
        if routing is None:
            assert rows is not None
            return rows.fixed  # [B, 1, E]
        weights = self._gate_weights(routing.weights).view(*lead, self.num_experts)
        return weights if rows is None else self._mix_rows(weights, rows)

    def _topk_delta(
        self,
        x: torch.Tensor,
        routing: Routing | None,
        rows: RowTensors | None,
        lead: tuple[int, ...],
    ) -> torch.Tensor:
        """Only the selected experts, each on its own tokens: x [N, in] -> [N, out]."""
        if rows is None:  # every token gated: the gate's top-k pairs
            assert routing is not None and routing.top_index is not None
            assert routing.top_weight is not None
            num_tokens, k = routing.top_index.shape
            token = torch.arange(num_tokens, device=x.device).repeat_interleave(k)  # [N*k]
            expert, weight = routing.top_index.reshape(-1), routing.top_weight.reshape(-1)
            if self.gate_config.null_expert and self.num_experts > self.num_gate_experts:
                real = expert < self.num_gate_experts  # the "no expert" slot is not an expert
                token, expert, weight = token[real], expert[real], weight[real]
            return self._grouped_delta(x, token, expert, weight)
        assert rows is not None
        weights = self._weights(routing, rows, lead).expand(*lead, -1)  # [B, T, E]
        weights = weights.reshape(x.shape[0], self.num_experts)  # [N, E]
        token, expert = weights.nonzero(as_tuple=True)  # fixed rows: their nonzero experts
        return self._grouped_delta(x, token, expert, weights[token, expert])

    def add_dense_delta(self, result: torch.Tensor, scaled: torch.Tensor) -> torch.Tensor:
        """result [*, out] += scaled [N, E*r] @ B_cat [E*r, out], in place (the base linear's
        backward does not need its output)."""
        lora_B = self.lora_B.view(-1, self.out_features)  # [E*r, out], contiguous
        if scaled.dtype != result.dtype:  # autocast over float32 weights
            scaled, lora_B = scaled.to(result.dtype), lora_B.to(result.dtype)
        result.view(-1, self.out_features).addmm_(scaled, lora_B)
        return result

    def _grouped_delta(
        self, x: torch.Tensor, token: torch.Tensor, expert: torch.Tensor, weight: torch.Tensor
    ) -> torch.Tensor:
        """Sum of weight * expert(x[token]) over (token, expert, weight) pairs [P] -> [N, out].

        Pairs are grouped by expert (one argsort), so each expert runs one matmul pair over its
        own tokens at its own rank; indices past the experts (the "no expert" slot) are skipped.
        """
        x = x.to(self.lora_A.dtype)
        order = expert.argsort()
        counts = torch.bincount(expert, minlength=self.num_experts).tolist()
        weight = weight.to(x.dtype)
        out = x.new_zeros(x.shape[0], self.out_features)
        start = 0
        for index, count in enumerate(counts[: self.num_experts]):
            if count and self.ranks[index]:
                pairs = order[start : start + count]
                tokens = token[pairs]
                rank = self.ranks[index]
                low_rank = F.linear(x.index_select(0, tokens), self.lora_A[index, :rank])
                y = low_rank @ self.lora_B[index, :rank]  # [n, out]
                out = out.index_add(0, tokens, y * weight[pairs, None])
            start += count
        return out

    def _trace(
        self, routing: Routing | None, rows: RowTensors | None, lead: tuple[int, ...]
    ) -> GateTrace:
        """This layer's routing over the model's slots (resident experts, then "no expert"):
        logits / probs / weights / selected [N, slots]. Non-gated rows show their fixed weights
        as probs and weights, and zero logits."""
        num_tokens = math.prod(lead)
        fixed = None
        if rows is not None:
            fixed = rows.fixed.float().expand(*lead, -1).reshape(num_tokens, -1)
            fixed = F.pad(fixed, (0, int(self.gate_config.null_expert)))  # [N, slots]
            if routing is None:
                return GateTrace(torch.zeros_like(fixed), fixed, fixed, fixed > 0)
        assert routing is not None
        logits, probs, weights = (
            t.reshape(num_tokens, -1) for t in (routing.logits, routing.probs, routing.weights)
        )
        if routing.top_index is not None:
            top_index = routing.top_index.reshape(num_tokens, -1)
            selected = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, top_index, True)
        else:
            selected = F.one_hot(probs.argmax(-1), probs.shape[-1]).bool()
        extra = self.num_experts - self.num_gate_experts
        at = self.num_gate_experts
        trace = GateTrace(
            _insert_columns(logits, at, extra),
            _insert_columns(probs, at, extra),
            _insert_columns(weights, at, extra),
            _insert_columns(selected, at, extra),
        )
        if fixed is None or rows is None or rows.gated is None:
            return trace
        gated = rows.gated.reshape(lead[0], 1).expand(*lead).reshape(num_tokens, 1)  # [N, 1]
        return GateTrace(
            torch.where(gated, trace.logits, torch.zeros_like(trace.logits)),
            torch.where(gated, trace.probs, fixed),
            torch.where(gated, trace.weights, fixed),
            torch.where(gated, trace.selected, fixed > 0),
        )

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, experts={self.num_experts} "
            f"(gate: {self.num_gate_experts}), ranks={self.ranks}, path={self.compute_path}"
        )


def _insert_columns(tensor: torch.Tensor, at: int, count: int) -> torch.Tensor:
    """tensor [N, S] with ``count`` zero (False) columns inserted before column ``at``."""
    if count == 0:
        return tensor
    zeros = tensor.new_zeros(tensor.shape[0], count)
    return torch.cat([tensor[:, :at], zeros, tensor[:, at:]], dim=-1)
