"""MoELoraModel: a base causal LM whose targeted linears are replaced by MoELoraLinear."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moelora.config import ComputePath, MoELoraConfig
from moelora.experts import ExpertAdapter, ExpertError, ExpertInfo, check_compatible, read_expert
from moelora.gate import Gate
from moelora.layer import MoELoraLinear
from moelora.losses import AuxLosses, GateTrace, aux_losses

NULL_SLOT = "none"


class MoELoraModel(nn.Module):
    """Frozen base model + frozen experts + trainable gates, in one forward pass.

    Only gate parameters require gradients. forward / generate are the base model's; the KV cache
    works as usual because every gate reads its own layer's input.
    """

    def __init__(
        self,
        base_model: nn.Module,
        experts: Sequence[ExpertAdapter],
        config: MoELoraConfig,
        expected_base_fingerprint: str | None = None,
    ) -> None:
        super().__init__()
        targets = set(check_compatible(list(experts), expected_base_fingerprint))
        base_model.requires_grad_(False)
        self.base_model = base_model
        self.config = config
        self.experts: tuple[ExpertInfo, ...] = tuple(e.info for e in experts)
        self.num_slots = len(experts) + int(config.gate.null_expert)
        self._gate_keys: dict[str, str] = {}  # layer path -> gate key
        shared_gates: dict[int, Gate] = {}
        paths = [name for name, _ in base_model.named_modules() if name in targets]
        missing = sorted(targets - set(paths))
        if missing:
            raise ExpertError(f"target modules not found in the base model: {missing[:5]}")
        for path in paths:
            module = base_model.get_submodule(path)
            if not isinstance(module, nn.Linear):
                raise ExpertError(f"target '{path}' is {type(module).__name__}, not nn.Linear")
            if config.gate.scope == "shared":
                gate_key = f"shared_in{module.in_features}"
                if module.in_features not in shared_gates:
                    shared_gates[module.in_features] = self._new_gate(module)
                gate = shared_gates[module.in_features]
            else:
                gate_key, gate = path, self._new_gate(module)
            layer = _build_layer(module, path, experts, gate, config)
            parent_path, _, child = path.rpartition(".")
            setattr(base_model.get_submodule(parent_path), child, layer)
            self._gate_keys[path] = gate_key

    def _new_gate(self, module: nn.Linear) -> Gate:
        # float32 even over a bf16 base: routing decisions are sensitive to rounding.
        return Gate(module.in_features, self.num_slots, self.config.gate).to(module.weight.device)

    @classmethod
    def from_adapters(
        cls,
        base_model: nn.Module,
        experts: Mapping[str, str | Path],
        config: MoELoraConfig | None = None,
        expected_base_fingerprint: str | None = None,
    ) -> MoELoraModel:
        """Build from {expert name: adapter folder}; folders are checked (see experts.py)."""
        adapters = [read_expert(name, folder) for name, folder in experts.items()]
        return cls(base_model, adapters, config or MoELoraConfig(), expected_base_fingerprint)

    # -- running -------------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model.generate(*args, **kwargs)  # type: ignore[operator]

    @property
    def expert_names(self) -> list[str]:
        return [e.name for e in self.experts]

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def slot_names(self) -> list[str]:
        return self.expert_names + ([NULL_SLOT] if self.config.gate.null_expert else [])

    def moe_layers(self) -> list[tuple[str, MoELoraLinear]]:
        """(path inside the base model, layer) in model order."""
        return [(p, self.base_model.get_submodule(p)) for p in self._gate_keys]  # type: ignore[misc]

    def gates(self) -> dict[str, Gate]:
        """Unique gates by key (the layer path, or "shared_in<width>" for shared gates)."""
        unique: dict[str, Gate] = {}
        for path, layer in self.moe_layers():
            unique.setdefault(self._gate_keys[path], layer.gate)
        return unique

    def gate_parameters(self) -> list[nn.Parameter]:
        return [p for gate in self.gates().values() for p in gate.parameters()]

    def gate_state_dict(self) -> dict[str, torch.Tensor]:
        return {
            f"{key}.{name}": tensor.detach()
            for key, gate in self.gates().items()
            for name, tensor in gate.state_dict().items()
        }

    def load_gate_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load gate weights; keys and shapes must match exactly."""
        expected = {k: v.shape for k, v in self.gate_state_dict().items()}
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or extra:
            raise ValueError(
                f"gate weights do not match: missing {missing[:5]}, unexpected {extra[:5]}"
            )
        for key, shape in expected.items():
            if state[key].shape != shape:
                raise ValueError(
                    f"gate weight '{key}' has shape {tuple(state[key].shape)}, expected {tuple(shape)}"
                )
        with torch.no_grad():
            for key, gate in self.gates().items():
                for name, tensor in gate.state_dict().items():
                    tensor.copy_(state[f"{key}.{name}"])

    def non_gate_trainable(self) -> list[str]:
        """Names of parameters outside the gates that require grad (should be empty)."""
        gate_ids = {id(p) for p in self.gate_parameters()}
        return [n for n, p in self.named_parameters() if p.requires_grad and id(p) not in gate_ids]

    def set_compute_path(self, path: ComputePath) -> None:
        if path == "topk" and self.config.gate.top_k is None:
            raise ValueError("compute_path='topk' needs gate.top_k to be set")
        for _, layer in self.moe_layers():
            layer.compute_path = path

    # -- introspection -------------------------------------------------------------------------

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Inside, every layer keeps its last routing (read it with gate_trace())."""
        layers = [layer for _, layer in self.moe_layers()]
        previous = [layer.record for layer in layers]
        for layer in layers:
            layer.record = True
        try:
            yield
        finally:
            for layer, was in zip(layers, previous, strict=True):
                layer.record = was
                layer.last_routing = None

    def gate_trace(self) -> GateTrace:
        """Stack the routings of the last forward (inside recording()) over layers: [L, T, S]."""
        routings = [layer.last_routing for _, layer in self.moe_layers()]
        if any(r is None for r in routings):
            raise RuntimeError("no recorded routing; run a forward pass inside model.recording()")
        logits, probs, weights, selected = [], [], [], []
        for routing in routings:
            assert routing is not None
            logits.append(routing.logits)
            probs.append(routing.probs)
            weights.append(routing.weights)
            if routing.top_index is not None:
                chosen = torch.zeros_like(routing.probs, dtype=torch.bool)
                selected.append(chosen.scatter(-1, routing.top_index, True))
            else:
                selected.append(F.one_hot(routing.probs.argmax(-1), self.num_slots).bool())
        return GateTrace(
            torch.stack(logits), torch.stack(probs), torch.stack(weights), torch.stack(selected)
        )

    def aux_losses(self, token_mask: torch.Tensor | None = None) -> AuxLosses:
        """Auxiliary losses of the last recorded forward, over tokens where token_mask is true."""
        trace = self.gate_trace().masked(token_mask)
        return aux_losses(trace, self.num_experts, self.config.aux)

    @torch.no_grad()
    def gate_weights(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Applied gate weights per token and layer: [B, seq, L, S] (layer order = moe_layers())."""
        with self.recording():
            self.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            weights = self.gate_trace().weights
        batch, seq = input_ids.shape
        return weights.permute(1, 0, 2).reshape(batch, seq, len(weights), self.num_slots)

    @contextmanager
    def fixed_gate(self, weights: Sequence[float] | torch.Tensor) -> Iterator[None]:
        """Replace every gate by constant slot weights [S] (e.g. one-hot on one expert).

        Weights for the experts only ([E]) are accepted too; the "no expert" slot then gets 0.
        """
        fixed = torch.as_tensor(weights, dtype=torch.float32).flatten()
        if fixed.numel() == self.num_experts and self.num_slots > self.num_experts:
            fixed = torch.cat([fixed, fixed.new_zeros(1)])
        if fixed.numel() != self.num_slots:
            raise ValueError(
                f"need {self.num_slots} slot weights {self.slot_names}, got {fixed.numel()}"
            )
        layers = [layer for _, layer in self.moe_layers()]
        for layer in layers:
            layer.fixed_weights = fixed
        try:
            yield
        finally:
            for layer in layers:
                layer.fixed_weights = None


def _build_layer(
    module: nn.Linear,
    path: str,
    experts: Sequence[ExpertAdapter],
    gate: Gate,
    config: MoELoraConfig,
) -> MoELoraLinear:
    """Stack the experts' weights for one module, zero-padded to the largest rank, B scaled."""
    ranks = tuple(int(e.weights[path][0].shape[0]) for e in experts)
    r_max = max(ranks)
    lora_A = torch.zeros(len(experts), r_max, module.in_features)
    lora_B = torch.zeros(module.out_features, len(experts), r_max)
    for index, expert in enumerate(experts):
        a, b = expert.weights[path]
        if a.shape[1] != module.in_features or b.shape[0] != module.out_features:
            raise ExpertError(
                f"expert '{expert.info.name}' '{path}' maps {a.shape[1]}->{b.shape[0]}, base "
                f"layer maps {module.in_features}->{module.out_features}"
            )
        lora_A[index, : ranks[index]] = a
        lora_B[:, index, : ranks[index]] = b * expert.scaling(path)
    device, dtype = module.weight.device, module.weight.dtype
    return MoELoraLinear(
        module,
        lora_A.to(device=device, dtype=dtype),
        lora_B.to(device=device, dtype=dtype),
        ranks,
        gate,
        config.gate,
        config.compute_path,
    )
