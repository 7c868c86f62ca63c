"""Configuration of the gate, the auxiliary losses and the compute path."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

GateKind = Literal["linear", "mlp"]
GateScope = Literal["per_module", "shared"]
ComputePath = Literal["dense", "topk"]


@dataclass(frozen=True)
class GateConfig:
    """How each wrapped layer turns its own input into expert weights.

    kind: "linear" (in -> slots) or "mlp" (in -> hidden_size -> SiLU -> slots).
    scope: "per_module" gives every wrapped linear its own gate; "shared" uses one gate for all
        wrapped linears with the same input width (still reading each layer's own input).
    temperature: softmax temperature (lower = sharper).
    top_k: keep the k largest weights per token and renormalise them; None = all slots.
    null_expert: add a "no expert" slot whose weight adds nothing (the token keeps the base output).
    noise_std: std of Gaussian noise added to the gate logits in training mode (exploration).
    normalize_input: RMS-normalise the input before the gate (layer inputs differ in scale).
    init_std: std of the normal init of the gate weights (biases start at zero).
    """

    kind: GateKind = "linear"
    scope: GateScope = "per_module"
    hidden_size: int = 64
    temperature: float = 1.0
    top_k: int | None = None
    null_expert: bool = False
    noise_std: float = 0.0
    normalize_input: bool = True
    init_std: float = 0.02

    def structure(self) -> tuple[object, ...]:
        """The fields that shape the gate's weights and function; the rest (temperature, top_k,
        noise, init) are routing choices that a trained gate can be used with."""
        return (self.kind, self.scope, self.hidden_size, self.null_expert, self.normalize_input)

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "mlp"):
            raise ValueError(f"gate.kind must be 'linear' or 'mlp', got {self.kind!r}")
        if self.scope not in ("per_module", "shared"):
            raise ValueError(f"gate.scope must be 'per_module' or 'shared', got {self.scope!r}")
        if self.hidden_size < 1:
            raise ValueError(f"gate.hidden_size must be >= 1, got {self.hidden_size}")
        if not self.temperature > 0:
            raise ValueError(f"gate.temperature must be > 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"gate.top_k must be >= 1 or null, got {self.top_k}")
        if self.noise_std < 0:
            raise ValueError(f"gate.noise_std must be >= 0, got {self.noise_std}")
        if self.init_std < 0:
            raise ValueError(f"gate.init_std must be >= 0, got {self.init_std}")


@dataclass(frozen=True)
class AuxLossConfig:
    """Weights of the auxiliary gate losses (0 disables a term; its value is still reported).

    load_balance: Switch/Mixtral loss E * sum_e f_e * P_e over the real experts.
    entropy: mean per-token gate entropy; a positive weight sharpens the gate, a negative one
        spreads it.
    z_loss: ST-MoE router z-loss, mean logsumexp(logits)^2.
    """

    load_balance: float = 0.01
    entropy: float = 0.0
    z_loss: float = 0.001


@dataclass(frozen=True)
class MoELoraConfig:
    """Everything that defines a MoE-LoRA model besides its experts.

    compute_path: "dense" runs all experts in one batched matmul and weights them (zero weights
        for experts outside the top-k); "topk" gathers and runs only the selected experts
        (needs gate.top_k).
    """

    gate: GateConfig = field(default_factory=GateConfig)
    aux: AuxLossConfig = field(default_factory=AuxLossConfig)
    compute_path: ComputePath = "dense"

    def __post_init__(self) -> None:
        if self.compute_path not in ("dense", "topk"):
            raise ValueError(f"compute_path must be 'dense' or 'topk', got {self.compute_path!r}")
        if self.compute_path == "topk" and self.gate.top_k is None:
            raise ValueError("compute_path='topk' needs gate.top_k to be set")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MoELoraConfig:
        """Build from a plain mapping (e.g. a Hydra node), refusing unknown keys by name."""
        _check_keys(data, cls, "moelora")
        gate = data.get("gate", {})
        aux = data.get("aux", {})
        _check_keys(gate, GateConfig, "moelora.gate")
        _check_keys(aux, AuxLossConfig, "moelora.aux")
        return cls(
            gate=GateConfig(**dict(gate)),
            aux=AuxLossConfig(**dict(aux)),
            compute_path=data.get("compute_path", "dense"),
        )


def _check_keys(data: Mapping[str, Any], cls: type, where: str) -> None:
    if not isinstance(data, Mapping):
        raise TypeError(f"{where} must be a mapping, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
