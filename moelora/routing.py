"""Per-call, per-row routing: which expert weights each row of a batch uses.

One batch can mix rows that use one expert (one-hot), the base model (all zeros), an explicit soft
mixture (e.g. a request router's probabilities) and the trained gate (``GATE``). A ``RowRouting``
is passed to ``MoELoraModel.forward`` / ``generate`` for that call only (PEFT's ``adapter_names``
per row, generalised to weights); the layers read it from a thread-local that is set for the
duration of the call, so nothing stays on the modules and calls in other threads do not see it.
(A thread-local rather than a ContextVar: torch.compile traces and guards it.)
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, TypeAlias

import torch

if TYPE_CHECKING:
    from moelora.losses import GateTrace


class _GateChoice:
    """The choice "let the trained gate route this row" (use the ``GATE`` singleton)."""

    _instance: _GateChoice | None = None

    def __new__(cls) -> _GateChoice:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "GATE"

    def __reduce__(self) -> str:
        return "GATE"


GATE: Final = _GateChoice()
Choice: TypeAlias = "str | Mapping[str, float] | Sequence[float] | _GateChoice | None"


@dataclass(frozen=True, eq=False)
class RowRouting:
    """Expert weights per batch row for one call. B = rows, E = resident experts, S = gate slots.

    weights [B, E] float32 (in ``model.expert_names`` order): what a non-gated row applies to every
        one of its tokens (one-hot = one adapter, zeros = the base model, any non-negative mix).
    gated [B] bool: rows that use the trained gate instead of ``weights`` (their weights row is
        ignored).
    gate_bias [B, S] float32 or None: added to the gate logits of gated rows after the temperature
        and before the softmax (S = ``model.gate_slot_names``); log-probabilities act as a per-row
        prior: probs ∝ exp(bias) · softmax(logits / T).
    """

    weights: torch.Tensor
    gated: torch.Tensor
    gate_bias: torch.Tensor | None = None
    # (any row gated, every row gated), computed once at validation (no device sync per call).
    _gated_flags: tuple[bool, bool] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        weights, gated, bias = self.weights, self.gated, self.gate_bias
        if weights.ndim != 2 or not weights.is_floating_point():
            raise ValueError(f"weights must be a float [B, E] tensor, got {_describe(weights)}")
        if gated.ndim != 1 or gated.shape[0] != weights.shape[0]:
            raise ValueError(f"gated must be [B={weights.shape[0]}], got {_describe(gated)}")
        if gated.dtype != torch.bool:
            raise ValueError(f"gated must be a bool tensor, got {gated.dtype}")
        if bias is not None and (bias.ndim != 2 or bias.shape[0] != weights.shape[0]):
            raise ValueError(f"gate_bias must be [B={weights.shape[0]}, S], got {_describe(bias)}")
        weights = weights.float()
        bad = ~torch.isfinite(weights) | (weights < 0)
        if bool(bad.any()):
            row, column = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"row {row}: weight {float(weights[row, column])} for expert {column}; "
                "weights must be finite and >= 0"
            )
        if bias is not None:
            bias = bias.float()
            bad_bias = torch.isnan(bias) | (bias == math.inf)
            if bool(bad_bias.any()):
                row = int(bad_bias.any(-1).nonzero()[0])
                raise ValueError(f"row {row}: gate_bias has NaN or +inf (-inf excludes a slot)")
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "gate_bias", bias)
        object.__setattr__(self, "_gated_flags", (bool(gated.any()), bool(gated.all())))

    @classmethod
    def _derived(
        cls,
        weights: torch.Tensor,
        gated: torch.Tensor,
        bias: torch.Tensor | None,
        flags: tuple[bool, bool] | None = None,
    ) -> RowRouting:
        """A routing made from validated values (moved, selected, repeated): not re-checked."""
        routing = object.__new__(cls)
        for name, value in (("weights", weights), ("gated", gated), ("gate_bias", bias)):
            object.__setattr__(routing, name, value)
        if flags is None:
            flags = (bool(gated.any()), bool(gated.all()))
        object.__setattr__(routing, "_gated_flags", flags)
        return routing

    @property
    def any_gated(self) -> bool:
        return self._gated_flags[0]

    @property
    def all_gated(self) -> bool:
        return self._gated_flags[1]

    @property
    def batch_size(self) -> int:
        return int(self.weights.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.weights.shape[1])

    @classmethod
    def from_choices(
        cls,
        choices: Sequence[Choice],
        expert_names: Sequence[str],
        device: torch.device | str | None = None,
        gate_bias: torch.Tensor | None = None,
    ) -> RowRouting:
        """One choice per row: None (base model), an expert name (one-hot), a mapping
        {expert: weight} (unnamed experts get 0), weights in ``expert_names`` order, or ``GATE``."""
        if isinstance(choices, str | Mapping) or choices is GATE:
            raise TypeError("choices must be a sequence with one choice per row")
        names = list(expert_names)
        index = {name: i for i, name in enumerate(names)}
        weights = torch.zeros(len(choices), len(names))
        gated = torch.zeros(len(choices), dtype=torch.bool)
        for row, choice in enumerate(choices):
            if choice is None:
                continue
            if choice is GATE:
                gated[row] = True
            elif isinstance(choice, str):
                if choice not in index:
                    raise ValueError(f"row {row}: unknown expert {choice!r}; experts: {names}")
                weights[row, index[choice]] = 1.0
            elif isinstance(choice, Mapping):
                for name, value in choice.items():
                    if name not in index:
                        raise ValueError(f"row {row}: unknown expert {name!r}; experts: {names}")
                    weights[row, index[name]] = _weight(value, row, repr(name))
            elif isinstance(choice, Sequence | torch.Tensor):
                values = list(choice)
                if len(values) != len(names):
                    raise ValueError(
                        f"row {row}: {len(values)} weights for {len(names)} experts {names}"
                    )
                for column, item in enumerate(values):
                    weights[row, column] = _weight(item, row, repr(names[column]))
            else:
                raise TypeError(
                    f"row {row}: choice must be None, an expert name, a mapping of expert "
                    f"weights or GATE, got {type(choice).__name__} {choice!r}"
                )
        routing = cls(weights, gated, gate_bias)
        return routing if device is None else routing.to(device)

    def to(self, device: torch.device | str) -> RowRouting:
        if self.weights.device == torch.device(device):
            return self
        bias = None if self.gate_bias is None else self.gate_bias.to(device)
        return self._derived(
            self.weights.to(device), self.gated.to(device), bias, self._gated_flags
        )

    def select(self, rows: Sequence[int] | torch.Tensor) -> RowRouting:
        """The routing of some rows, in the given order (e.g. a batch shrinking as requests end)."""
        index = torch.as_tensor(rows, dtype=torch.long, device=self.weights.device)
        bias = None if self.gate_bias is None else self.gate_bias.index_select(0, index)
        return self._derived(
            self.weights.index_select(0, index), self.gated.index_select(0, index), bias
        )

    def repeat_interleave(self, repeats: int) -> RowRouting:
        """Each row ``repeats`` times in place (what generate does for num_return_sequences)."""
        bias = None if self.gate_bias is None else self.gate_bias.repeat_interleave(repeats, 0)
        weights = self.weights.repeat_interleave(repeats, 0)
        gated = self.gated.repeat_interleave(repeats)
        return self._derived(weights, gated, bias, self._gated_flags)

    @classmethod
    def cat(cls, routings: Sequence[RowRouting]) -> RowRouting:
        """Stack the rows of several routings (same experts; all with or all without gate_bias)."""
        biases = [r.gate_bias for r in routings]
        if any(b is None for b in biases) and not all(b is None for b in biases):
            raise ValueError("cannot concatenate routings with and without gate_bias")
        flags = (
            any(r.any_gated for r in routings),
            all(r.all_gated for r in routings),
        )
        return cls._derived(
            torch.cat([r.weights for r in routings]),
            torch.cat([r.gated for r in routings]),
            None if biases[0] is None else torch.cat(biases),  # type: ignore[arg-type]
            flags,
        )


def check_routing(
    routing: RowRouting, batch: int | None, expert_names: list[str], gate_slots: list[str]
) -> None:
    """A model's check of a call's row_routing (PEFT's _check_forward_args): type, rows, widths."""
    if not isinstance(routing, RowRouting):
        raise TypeError(f"row_routing must be a RowRouting, got {type(routing).__name__}")
    if batch is not None and routing.batch_size != batch:
        raise ValueError(f"row_routing has {routing.batch_size} rows but the batch has {batch}")
    if routing.num_experts != len(expert_names):
        raise ValueError(
            f"row_routing.weights has {routing.num_experts} columns but the model has "
            f"{len(expert_names)} experts {expert_names}"
        )
    if routing.gate_bias is not None and routing.gate_bias.shape[1] != len(gate_slots):
        raise ValueError(
            f"row_routing.gate_bias has {routing.gate_bias.shape[1]} columns but the gate has "
            f"{len(gate_slots)} slots {gate_slots}"
        )


def _weight(value: object, row: int, what: str) -> float:
    if not isinstance(value, int | float | torch.Tensor) or isinstance(value, bool):
        raise ValueError(f"row {row}: weight for {what} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"row {row}: weight {number} for {what}; weights must be finite and >= 0")
    return number


def _describe(tensor: object) -> str:
    if isinstance(tensor, torch.Tensor):
        return f"{tensor.dtype} {tuple(tensor.shape)}"
    return type(tensor).__name__


# -- the per-call plumbing (used by MoELoraModel and MoELoraLinear) ------------------------------


@dataclass(frozen=True, eq=False)
class RowTensors:
    """A RowRouting laid out for one layer's device and dtype (computed once per call).

    fixed [B, 1, E] (broadcasts over tokens); gated [B, 1, 1] bool, or None when every row or no
    row is gated (then any_gated tells which); bias [B, 1, S] float32 or None.
    """

    fixed: torch.Tensor
    gated: torch.Tensor | None
    bias: torch.Tensor | None
    any_gated: bool


@dataclass
class CallScope:
    """What one forward / generate call of one model passes to its layers.

    routing None = the gate on every row. recorder, when set, collects each layer's GateTrace
    (keyed by layer id) for gate_trace() / aux losses.
    """

    owner: object
    routing: RowRouting | None = None
    recorder: dict[int, GateTrace] | None = None
    any_gated: bool = True
    all_gated: bool = True
    _laid_out: dict[tuple[torch.device, torch.dtype], RowTensors] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.routing is not None:
            self.any_gated, self.all_gated = self.routing.any_gated, self.routing.all_gated

    def rows(self, device: torch.device, dtype: torch.dtype) -> RowTensors:
        key = (device, dtype)
        laid_out = self._laid_out.get(key)
        if laid_out is None:
            routing = self.routing
            assert routing is not None
            gated = None
            if self.any_gated and not self.all_gated:
                gated = routing.gated.to(device)[:, None, None]  # [B, 1, 1]
            bias = None
            if routing.gate_bias is not None:
                bias = routing.gate_bias.to(device)[:, None, :]  # [B, 1, S]
            fixed = routing.weights.to(device=device, dtype=dtype)[:, None, :]  # [B, 1, E]
            laid_out = self._laid_out[key] = RowTensors(fixed, gated, bias, self.any_gated)
        return laid_out


_CURRENT = threading.local()


def current_scope(owner: object) -> CallScope | None:
    """The scope of the call in progress for ``owner``'s layers (None outside a call or when
    another model's call is in progress)."""
    scope: CallScope | None = getattr(_CURRENT, "scope", None)
    return scope if scope is not None and scope.owner is owner else None


@contextmanager
def call_scope(scope: CallScope | None) -> Iterator[None]:
    """Make ``scope`` visible to the layers for the duration of the block (None: nothing)."""
    if scope is None:
        yield
        return
    previous = getattr(_CURRENT, "scope", None)
    _CURRENT.scope = scope
    try:
        yield
    finally:
        _CURRENT.scope = previous
