"""MoELoraModel: a base causal LM whose targeted linears are replaced by MoELoraLinear."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import nn

from moelora.config import ComputePath, MoELoraConfig
from moelora.experts import ExpertAdapter, ExpertError, ExpertInfo, check_compatible, read_expert
from moelora.gate import Gate
from moelora.layer import MoELoraLinear
from moelora.losses import AuxLosses, GateTrace, aux_losses
from moelora.routing import CallScope, RowRouting, call_scope, check_routing
from moelora.stacking import append_expert, check_fits, drop_expert, find_target, stack_experts

NULL_SLOT = "none"
UNLOADED = "this MoELoraModel was unloaded (unload() or the end of its with-block); build a new one"


class MoELoraModel(nn.Module):
    """Frozen base model + frozen experts + trainable gates, in one forward pass.

    Only gate parameters require gradients. forward / generate are the base model's plus an
    optional per-call ``row_routing`` (see routing.RowRouting); the KV cache works as usual
    because every gate reads its own layer's input. A target that is already a PEFT LoRA layer
    (anything with ``base_layer`` / ``get_base_layer()``) keeps its adapters: its innermost base
    layer is wrapped. ``unload()`` (or leaving a ``with`` block) puts every original module back.
    """

    def __init__(
        self,
        base_model: nn.Module,
        experts: Sequence[ExpertAdapter],
        config: MoELoraConfig,
        expected_base_fingerprint: str | None = None,
    ) -> None:
        super().__init__()
        experts = list(experts)
        targets = set(check_compatible(experts, expected_base_fingerprint))
        self.base_fingerprint = expected_base_fingerprint or experts[0].info.base_fingerprint
        self.config = config
        self.gate_experts: tuple[ExpertInfo, ...] = tuple(e.info for e in experts)
        self.experts: tuple[ExpertInfo, ...] = self.gate_experts
        self._owner = object()  # tells this model's calls apart from other models' (routing.py)
        self._recorder: dict[int, GateTrace] | None = None
        self._fixed: torch.Tensor | None = None
        self._unloaded = False
        paths = [name for name, _ in base_model.named_modules() if name in targets]
        missing = sorted(targets - set(paths))
        if missing:
            raise ExpertError(f"target modules not found in the base model: {missing[:5]}")
        # Every layer is built (and every check passed) before the base model is touched.
        self._layers: dict[str, MoELoraLinear] = {}  # by expert-target path, model order
        self._gate_keys: dict[str, str] = {}  # layer path -> gate key
        self._replaced: list[tuple[nn.Module, str, nn.Module]] = []  # (holder, attr, original)
        shared_gates: dict[int, Gate] = {}
        for path in paths:
            holder, attribute, module = find_target(base_model, path)
            if config.gate.scope == "shared":
                gate_key = f"shared_in{module.in_features}"
                if module.in_features not in shared_gates:
                    shared_gates[module.in_features] = self._new_gate(module)
                gate = shared_gates[module.in_features]
            else:
                gate_key, gate = path, self._new_gate(module)
            lora_A, lora_B, ranks = stack_experts(module, path, experts)
            layer = MoELoraLinear(
                module, lora_A, lora_B, ranks, gate, config.gate, config.compute_path
            )
            layer.owner = self._owner
            self._replaced.append((holder, attribute, module))
            self._layers[path] = layer
            self._gate_keys[path] = gate_key
        self._requires_grad = [(p, p.requires_grad) for p in base_model.parameters()]
        base_model.requires_grad_(False)
        self.base_model = base_model
        for (holder, attribute, _), layer in zip(
            self._replaced, self._layers.values(), strict=True
        ):
            setattr(holder, attribute, layer)

    def _new_gate(self, module: nn.Linear) -> Gate:
        # float32 even over a bf16 base: routing decisions are sensitive to rounding.
        num_slots = len(self.gate_experts) + int(self.config.gate.null_expert)
        return Gate(module.in_features, num_slots, self.config.gate).to(module.weight.device)

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

    def _check_live(self) -> None:
        if self._unloaded:
            raise RuntimeError(UNLOADED)

    def __getattr__(self, name: str) -> Any:
        if name == "base_model" and self.__dict__.get("_unloaded"):
            raise RuntimeError(UNLOADED)
        return super().__getattr__(name)

    # -- running -------------------------------------------------------------------------------

    def forward(self, *args: Any, row_routing: RowRouting | None = None, **kwargs: Any) -> Any:
        """The base model's forward; ``row_routing`` (rows = batch size) routes each row for this
        call only: a fixed expert mix per row, or the gate (None = the gate on every row)."""
        scope = self._scope(row_routing, _batch_size(args, kwargs))
        with call_scope(scope):
            return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, row_routing: RowRouting | None = None, **kwargs: Any) -> Any:
        """The base model's generate (KV cache on); ``row_routing`` applies to the prefill and
        every decoding step. Rows are repeated for num_return_sequences; beam search with a
        per-row routing is refused (beams reorder rows)."""
        config = kwargs.get("generation_config") or getattr(
            self.base_model, "generation_config", None
        )
        num_beams = int(kwargs.get("num_beams") or getattr(config, "num_beams", 1) or 1)
        returns = int(
            kwargs.get("num_return_sequences") or getattr(config, "num_return_sequences", 1) or 1
        )
        if row_routing is not None and num_beams > 1:
            raise ValueError(
                f"row_routing does not support beam search (num_beams={num_beams}): beams "
                "reorder the rows; use greedy or sampling, or one routing per call"
            )
        expand = num_beams if num_beams > 1 else returns
        if row_routing is not None and expand > 1:
            self._check_routing(row_routing, _batch_size(args, kwargs))
            row_routing = row_routing.repeat_interleave(expand)
        batch = _batch_size(args, kwargs)
        scope = self._scope(row_routing, None if batch is None else batch * expand)
        with call_scope(scope):
            return self.base_model.generate(*args, **kwargs)  # type: ignore[operator]

    def _scope(self, routing: RowRouting | None, batch: int | None) -> CallScope | None:
        """What this call passes to the layers (None: nothing, the gate on every row)."""
        if routing is None and self._fixed is not None:
            if batch is None:
                raise ValueError("fixed_gate() needs input_ids or inputs_embeds for the batch size")
            fixed = self._fixed[: self.num_experts].to(self._device())  # checked by fixed_gate()
            no_row = torch.zeros(batch, dtype=torch.bool, device=fixed.device)
            routing = RowRouting._derived(fixed.expand(batch, -1), no_row, None, (False, False))
        if routing is None and self._recorder is None:
            self._check_live()
            return None
        if routing is not None:
            self._check_routing(routing, batch)
            routing = routing.to(self._device())
        return CallScope(owner=self._owner, routing=routing, recorder=self._recorder)

    def _check_routing(self, routing: RowRouting, batch: int | None) -> None:
        check_routing(routing, batch, self.expert_names, self.gate_slot_names)

    def _device(self) -> torch.device:
        return next(iter(self._layers.values())).lora_A.device

    # -- names ---------------------------------------------------------------------------------

    @property
    def expert_names(self) -> list[str]:
        """Every resident expert (the columns of RowRouting.weights): gate experts, then added."""
        return [e.name for e in self.experts]

    @property
    def gate_expert_names(self) -> list[str]:
        """The experts the trained gate mixes (fixed when the model is built or loaded)."""
        return [e.name for e in self.gate_experts]

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def num_gate_experts(self) -> int:
        return len(self.gate_experts)

    @property
    def slot_names(self) -> list[str]:
        """Columns of gate_trace() / gate_weights(): resident experts, then "none" if enabled."""
        return self.expert_names + ([NULL_SLOT] if self.config.gate.null_expert else [])

    @property
    def gate_slot_names(self) -> list[str]:
        """The gate's outputs (columns of RowRouting.gate_bias): gate experts, then "none"."""
        return self.gate_expert_names + ([NULL_SLOT] if self.config.gate.null_expert else [])

    @property
    def num_slots(self) -> int:
        return len(self.slot_names)

    # -- layers and gates ----------------------------------------------------------------------

    def moe_layers(self) -> list[tuple[str, MoELoraLinear]]:
        """(expert target path inside the base model, layer) in model order."""
        self._check_live()
        return list(self._layers.items())

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

    # -- hot add / remove (not thread-safe: call between forward calls, under the caller's lock) -

    def add_expert(self, adapter: ExpertAdapter) -> None:
        """Make one more expert resident (a RowRouting column; the gate gives it weight 0).

        ``adapter`` comes from ``read_expert`` (manifest, sha256 and LoRA options checked); it
        must share the base fingerprint, and target a subset of the wrapped modules with the same
        widths (modules it does not target get rank 0). Outputs for the other experts are
        unchanged. Not thread-safe: call it between forward calls.
        """
        self._check_live()
        info = adapter.info
        if info.name in self.expert_names:
            raise ExpertError(f"expert '{info.name}' is already resident {self.expert_names}")
        if info.base_fingerprint != self.base_fingerprint:
            raise ExpertError(
                f"expert '{info.name}' was trained on base fingerprint {info.base_fingerprint} "
                f"({info.base_name}), but this model's base has {self.base_fingerprint}"
            )
        layers = dict(self.moe_layers())
        check_fits(layers, adapter)
        for path, layer in layers.items():
            append_expert(layer, adapter, path)
        self.experts = (*self.experts, info)

    def remove_expert(self, name: str) -> None:
        """Drop an added expert (gate experts cannot be removed: the gate has slots for them).
        Outputs for the other experts are unchanged. Not thread-safe: call between forward calls.
        """
        self._check_live()
        if name in self.gate_expert_names:
            raise ExpertError(
                f"expert '{name}' is one of the gate's experts {self.gate_expert_names} and cannot "
                "be removed; only experts added with add_expert() can"
            )
        if name not in self.expert_names:
            raise ExpertError(f"no resident expert '{name}'; resident: {self.expert_names}")
        index = self.expert_names.index(name)
        for _, layer in self.moe_layers():
            drop_expert(layer, index)
        self.experts = tuple(e for e in self.experts if e.name != name)

    # -- unwrapping ----------------------------------------------------------------------------

    def unload(self) -> nn.Module:
        """Put every original module back (the same objects), restore each base parameter's
        previous requires_grad, and return the base model. This model is unusable afterwards."""
        base_model = self.base_model
        for holder, attribute, original in reversed(self._replaced):
            setattr(holder, attribute, original)
        for parameter, requires_grad in self._requires_grad:
            parameter.requires_grad_(requires_grad)
        del self._modules["base_model"]
        self._replaced, self._layers, self._requires_grad = [], {}, []
        self._unloaded = True
        return base_model

    def __enter__(self) -> MoELoraModel:
        self._check_live()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if not self._unloaded:
            self.unload()

    # -- introspection -------------------------------------------------------------------------

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Inside, every call collects each layer's routing (read the last one with gate_trace())."""
        previous = self._recorder
        self._recorder = {}
        try:
            yield
        finally:
            self._recorder = previous

    def gate_trace(self) -> GateTrace:
        """Routings of the last call inside recording(), stacked over layers: [L, T, S]
        (S = slot_names; rows that did not use the gate show their fixed weights)."""
        recorder = self._recorder or {}
        traces = [recorder.get(id(layer)) for _, layer in self.moe_layers()]
        if not traces or any(t is None for t in traces):
            raise RuntimeError("no recorded routing; run a forward pass inside model.recording()")
        return GateTrace(
            torch.stack([t.logits for t in traces]),  # type: ignore[union-attr]
            torch.stack([t.probs for t in traces]),  # type: ignore[union-attr]
            torch.stack([t.weights for t in traces]),  # type: ignore[union-attr]
            torch.stack([t.selected for t in traces]),  # type: ignore[union-attr]
        )

    def aux_losses(self, token_mask: torch.Tensor | None = None) -> AuxLosses:
        """Auxiliary losses of the last recorded forward, over tokens where token_mask is true."""
        trace = self.gate_trace().masked(token_mask)
        return aux_losses(trace, self.num_gate_experts, self.config.aux)

    @torch.no_grad()
    def gate_weights(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        row_routing: RowRouting | None = None,
    ) -> torch.Tensor:
        """Applied expert weights per token and layer: [B, seq, L, S] (layer order = moe_layers(),
        S = slot_names)."""
        with self.recording():
            self(
                input_ids=input_ids,
                attention_mask=attention_mask,
                use_cache=False,
                row_routing=row_routing,
            )
            weights = self.gate_trace().weights
        batch, seq = input_ids.shape
        return weights.permute(1, 0, 2).reshape(batch, seq, len(weights), self.num_slots)

    @contextmanager
    def fixed_gate(self, weights: Sequence[float] | torch.Tensor) -> Iterator[None]:
        """Inside, calls without a row_routing use constant weights on every row (ablations):
        slot weights [S] over slot_names (e.g. one-hot on one expert), or expert weights [E]."""
        fixed = torch.as_tensor(weights, dtype=torch.float32).flatten()
        if fixed.numel() == self.num_experts and self.num_slots > self.num_experts:
            fixed = torch.cat([fixed, fixed.new_zeros(1)])
        if fixed.numel() != self.num_slots:
            raise ValueError(
                f"need {self.num_slots} slot weights {self.slot_names}, got {fixed.numel()}"
            )
        RowRouting(fixed[None, : self.num_experts], torch.zeros(1, dtype=torch.bool))  # checks
        previous = self._fixed
        self._fixed = fixed
        try:
            yield
        finally:
            self._fixed = previous


def _batch_size(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int | None:
    """Rows of the call's input_ids / inputs_embeds (None if neither is given)."""
    for value in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *args[:1]):
        if isinstance(value, torch.Tensor) and value.ndim >= 2:
            return int(value.shape[0])
    return None
