"""The systems compared, all over the same frozen experts, and what each request runs.

Request-level systems (base, single experts, oracle, the uniform ``cat`` merge, the router and its
soft mixture) and MoE-LoRA are ``RoutedSystem``s: rows of ONE ``MoELoraModel`` that holds every
expert on the shared base, each request routed on its own row (``moelora.RowRouting``), so a
batch of mixed choices is one forward. A request's ``Choice``:

- ``None``: the base model (all expert weights 0);
- an expert name: that expert alone (one-hot), exactly PEFT with that adapter;
- ``{expert: weight}``: the exact weighted sum of the experts' LoRA deltas (uniform weights = PEFT's
  ``cat`` merge; the router's probabilities = ``router_soft``);
- ``GATE``: MoE-LoRA's trained gate, token by token;
- ``GatePrior(bias)``: the gate with a per-request prior added to every layer's gate logits (the
  router's probabilities, ``loralab.routing.prior``): ``moelora_prior`` and its ablations;
- a tuple of expert names: the best of them for that request (the two-domain oracle), read from
  the scores of each single choice.

``None`` and single experts are "single choices": each is scored once per example and every
system that picks it reads that result. PEFT's TIES merge, X-LoRA and Arrow are ``ModelSystem``s:
a PEFT model of their own, built on the same shared base and unloaded after use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, Union

import torch

from loralab.data.records import Record
from moelora.routing import GATE, RowRouting
from moelora.routing import Choice as RowChoice


@dataclass(frozen=True)
class GatePrior:
    """The trained gate with ``bias`` [S] (gate slots order) added to its logits in every layer."""

    bias: tuple[float, ...]


Choice = Union[RowChoice, GatePrior, tuple[str, ...]]  # noqa: UP007  (runtime alias; tuple = best-of)
SingleChoice = Union[None, str]  # noqa: UP007  (the base model, or one expert)
T = TypeVar("T")


@dataclass(frozen=True)
class RoutedSystem:
    """A system served by the shared MoE-LoRA model, one ``Choice`` per request.

    ``route_live`` is what serving one request runs to decide (the router's ``route`` on the
    request text), timed inside the time to first token; None: ``choose`` is free (a constant,
    the gold label, the gate).
    """

    name: str
    choose: Callable[[Record], Choice]
    route_live: Callable[[Record], Choice] | None = None
    gate: str | None = None  # the trained gate its GATE rows use (None: the model's gate)


@dataclass(frozen=True)
class ModelSystem:
    """A system that is a model of its own on the shared base (PEFT TIES merge, X-LoRA, Arrow)."""

    name: str
    model: Any


System = Union[RoutedSystem, ModelSystem]  # noqa: UP007  (runtime alias)


def single_options(choice: Choice) -> tuple[SingleChoice, ...] | None:
    """The single choices whose results ``choice`` reads (one, or several for best-of), or None
    when it needs a forward of its own (a weighted mixture, the gate)."""
    if choice is None or isinstance(choice, str):
        return (choice,)
    if isinstance(choice, tuple):
        return choice
    return None


def uses_gate(choice: Choice) -> bool:
    return choice is GATE or isinstance(choice, GatePrior)


def row_routing(
    choices: Sequence[Choice], expert_names: Sequence[str], device: torch.device | str
) -> RowRouting:
    """The ``RowRouting`` of one choice per row (no best-of tuples); ``GatePrior`` rows are gated
    with their bias (the other rows get a zero bias, which changes nothing)."""
    priors = [c for c in choices if isinstance(c, GatePrior)]
    if not priors:
        return RowRouting.from_choices(choices, expert_names, device)  # type: ignore[arg-type]
    width = len(priors[0].bias)
    bias = torch.tensor(
        [c.bias if isinstance(c, GatePrior) else (0.0,) * width for c in choices]
    )  # [B, S]
    plain = [GATE if isinstance(c, GatePrior) else c for c in choices]
    return RowRouting.from_choices(plain, expert_names, device, gate_bias=bias)  # type: ignore[arg-type]


def served_choice(choice: Choice) -> RowChoice | GatePrior:
    """What a request runs when it is served (generation, cost): best-of serves its first option."""
    return choice[0] if isinstance(choice, tuple) else choice


def pending_rounds(needs: Sequence[Sequence[T]]) -> Iterator[tuple[list[int], list[T]]]:
    """For k = 0, 1, ...: the rows that still need a k-th item, and that item. Each round is one
    mixed batch (every row routed on its own), so N choices per row cost N forwards, not N * rows."""
    depth = max((len(n) for n in needs), default=0)
    for k in range(depth):
        rows = [i for i, n in enumerate(needs) if len(n) > k]
        yield rows, [needs[i][k] for i in rows]


def gold_choice(record: Record, experts: Sequence[str]) -> Choice:
    """The oracle: the gold domain's expert; base for general; the better gold expert for pairs."""
    if record.domain in experts:
        return record.domain
    parts = tuple(d for d in record.domain.split("+") if d in experts)
    if len(parts) > 1:
        return parts
    return parts[0] if parts else None


def gold_label(record: Record, experts: Sequence[str]) -> str:
    """The router's gold label for a single-domain record (``base`` for non-expert domains)."""
    return record.domain if record.domain in experts else "base"
