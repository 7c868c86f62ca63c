"""Build the systems named in ``cfg.eval.systems`` on the shared base model, one group at a time.

Groups: the routed systems (request-level systems, MoE-LoRA and ``moelora_prior``) on ONE
``MoELoraModel`` holding every expert (the trained gates are swapped in as each system needs:
``GateBank``); then PEFT's TIES merge, X-LoRA and Arrow, each a PEFT model of its own. Each group
is built on the shared base inside ``SharedBase.lend``, used, unloaded, and the base is checked.

``moelora_prior`` and its ablations (the router's probabilities as a prior on the gate logits,
``loralab.routing.prior``): ``moelora_prior`` the gate trained with the prior, used with it;
``moelora_prior_nobias`` the gate trained with the prior, used without it; the other names read
``moelora_prior[_infer][_request|_segments|_agree][_s<x>][_f<y>]``: ``_infer`` the plain MoE-LoRA
gate with the prior at inference only, ``_request`` / ``_segments`` / ``_agree`` the router's
probabilities pooled that way instead of the trained pooling, ``_s<x>`` the prior at scale ``x``
instead of the trained scale, ``_f<y>`` the probability floor ``y`` (``0.<digits>``) instead of the
trained floor.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from loralab.artifacts import load_expert
from loralab.baselines import build_arrow, build_xlora
from loralab.data.records import Record
from loralab.evaluation.shared_base import SharedBase
from loralab.evaluation.systems import Choice, GatePrior, ModelSystem, RoutedSystem, gold_choice
from loralab.routing.prior import (
    decision_probs,
    gate_bias,
    pool_segments,
    route_pooled,
    route_segments,
    slot_probs,
)
from loralab.training.xlora import load_xlora_classifier

log = logging.getLogger(__name__)

ROUTED = ("base", "oracle", "merge_cat", "router", "router_soft", "moelora", "moelora_prior_nobias")
# moelora_prior, moelora_prior_infer, moelora_prior_segments, moelora_prior_infer_request_s0.5, ...
PRIOR_SYSTEM = re.compile(
    r"moelora_prior(?P<infer>_infer)?(?:_(?P<pool>request|segments|agree))?"
    r"(?:_s(?P<scale>\d+(?:\.\d+)?))?(?:_f(?P<floor>0\.\d+))?"
)


@dataclass(frozen=True)
class PriorSetting:
    """How the router prior is applied: ``scale * log max(p, floor)``, p pooled as ``pool``."""

    scale: float = 1.0
    floor: float = 1e-4
    pool: str = "request"


PEFT_SYSTEMS = ("merge_ties", "xlora", "arrow")
KNOWN = (*ROUTED, *PEFT_SYSTEMS)


class RouterChoices:
    """The request router's decisions per record id (``prepare`` routes many with one encoder
    call) and a fresh decision for one request (``live``, what serving it runs)."""

    def __init__(self, router_dir: str | Path, experts: Sequence[str]) -> None:
        import router

        self.router: Any = router.load(router_dir)
        self.model_version = str(self.router.model_version)
        self.experts = list(experts)
        self.decisions: dict[str, Any] = {}
        # record id -> (characters, probabilities) of each of its paragraphs
        self.segments: dict[str, list[tuple[int, dict[str, float]]]] = {}

    def prepare(self, records: Sequence[Record], segments: bool = False) -> None:
        """Route ``records`` (one batch call); with ``segments``, also each one's paragraphs
        (``loralab.routing.prior.route_segments``), for the prior systems."""
        todo = list({r.id: r for r in records if r.id not in self.decisions}.values())
        if todo:
            decisions = self.router.route_batch([r.instruction for r in todo])
            for r, d in zip(todo, decisions, strict=True):
                self.decisions[r.id] = d
        todo = list({r.id: r for r in records if r.id not in self.segments}.values())
        if segments and todo:
            whole = [self.decisions[r.id] for r in todo]
            routed = route_segments(self.router, [r.instruction for r in todo], whole)
            self.segments.update((r.id, p) for r, p in zip(todo, routed, strict=True))

    def release(self) -> None:
        """Drop the router (its encoder) once no system needs new decisions; keep the decisions."""
        self.router = None

    def _hard(self, decision: Any) -> Choice:
        return decision.label if decision.label in self.experts else None

    def _soft(self, decision: Any) -> Choice:
        """The router's probabilities as expert weights; the ``base`` mass adds no adapter."""
        if not decision.probs:
            return None
        return {d: float(decision.probs.get(d, 0.0)) for d in self.experts}

    def hard(self, record: Record) -> Choice:
        return self._hard(self.decisions[record.id])

    def soft(self, record: Record) -> Choice:
        return self._soft(self.decisions[record.id])

    def live_hard(self, record: Record) -> Choice:
        return self._hard(self.router.route(record.instruction))

    def live_soft(self, record: Record) -> Choice:
        return self._soft(self.router.route(record.instruction))

    def _probs(self, record: Record, pool: str) -> Mapping[str, float]:
        if pool == "request":
            return decision_probs(self.decisions[record.id])
        return pool_segments(self.segments[record.id], pool)

    def prior(self, slots: Sequence[str], setting: PriorSetting) -> Callable[[Record], Choice]:
        """record -> ``GatePrior``: the gate-logit prior of the router's probabilities over the
        gate ``slots`` (decided in ``prepare``)."""

        def choose(record: Record) -> Choice:
            return _gate_prior(self._probs(record, setting.pool), slots, setting)

        return choose

    def live_prior(self, slots: Sequence[str], setting: PriorSetting) -> Callable[[Record], Choice]:
        """Like ``prior``, deciding afresh (what serving one request runs)."""

        def choose(record: Record) -> Choice:
            probs = route_pooled(self.router, [record.instruction], setting.pool)[0]
            return _gate_prior(probs, slots, setting)

        return choose


def _gate_prior(probs: Mapping[str, float], slots: Sequence[str], setting: PriorSetting) -> Choice:
    bias = gate_bias(slot_probs(probs, slots), setting.scale, setting.floor)
    return GatePrior(tuple(float(b) for b in bias))


EACH_EXPERT = "expert_*"  # in eval.systems: expert_<d> for every domain of data.domains


def expand_systems(names: Sequence[str], experts: Sequence[str]) -> list[str]:
    """``eval.systems`` with ``expert_*`` replaced by ``expert_<d>`` for each of ``experts``."""
    out: list[str] = []
    for name in names:
        for n in [f"expert_{d}" for d in experts] if name == EACH_EXPERT else [name]:
            if n not in out:
                out.append(n)
    return out


def chosen_systems(
    key: str, wanted: Sequence[str] | None, names: Sequence[str], experts: Sequence[str]
) -> set[str]:
    """The systems a config list ``key`` (e.g. ``eval.cost.systems``) names, ``expert_*``
    expanded; None = every evaluated system. Each must be in ``names`` (evaluated)."""
    if wanted is None:
        return set(names)
    chosen = expand_systems([str(n) for n in wanted], experts)
    missing = [n for n in chosen if n not in names]
    if missing:
        raise ValueError(f"{key}: {missing} not in eval.systems {list(names)}")
    return set(chosen)


def check_names(names: Sequence[str], experts: Sequence[str]) -> None:
    allowed = {*KNOWN, *(f"expert_{d}" for d in experts)}
    unknown = [n for n in names if n not in allowed and not PRIOR_SYSTEM.fullmatch(n)]
    if unknown:
        raise ValueError(f"eval.systems: unknown system(s) {unknown}; known: {sorted(allowed)}")


def is_routed(name: str) -> bool:
    return name in ROUTED or name.startswith("expert_") or bool(PRIOR_SYSTEM.fullmatch(name))


def gate_of(name: str) -> str | None:
    """The trained gate a routed system runs: ``moelora``, ``moelora_prior`` or None (none)."""
    if name == "moelora":
        return "moelora"
    if name == "moelora_prior_nobias":
        return "moelora_prior"
    m = PRIOR_SYSTEM.fullmatch(name)
    if m is None:
        return None
    return "moelora" if m["infer"] else "moelora_prior"


def needs_router(name: str) -> bool:
    """Whether a system reads the router's decisions."""
    return name in ("router", "router_soft") or bool(PRIOR_SYSTEM.fullmatch(name))


def groups(names: Sequence[str]) -> list[list[str]]:
    """The build order: all routed systems together, then each PEFT system on its own."""
    routed = [n for n in names if is_routed(n)]
    return ([routed] if routed else []) + [[n] for n in names if not is_routed(n)]


def need(path: Any, what: str, system: str) -> Path:
    if path is None or not Path(path).exists():
        raise FileNotFoundError(
            f"system {system!r} needs the {what} (got {path}); train it or drop the system"
        )
    return Path(path)


def constant(choice: Choice) -> Callable[[Record], Choice]:
    return lambda record: choice


def routed_systems(
    names: Sequence[str],
    experts: Sequence[str],
    choices: RouterChoices | None,
    slots: Sequence[str] = (),
    prior: PriorSetting = PriorSetting(),
) -> dict[str, RoutedSystem]:
    """The routed systems among ``names`` (those in ``needs_router`` need ``choices``; the prior
    systems the gate ``slots`` and the ``prior`` setting the prior gate was trained with)."""
    from moelora import GATE

    uniform = {d: 1.0 / len(experts) for d in experts}  # PEFT's `cat` merge with equal weights
    out: dict[str, RoutedSystem] = {}
    for name in names:
        if name == "base":
            out[name] = RoutedSystem(name, constant(None))
        elif name.startswith("expert_"):
            out[name] = RoutedSystem(name, constant(name.removeprefix("expert_")))
        elif name == "oracle":
            out[name] = RoutedSystem(name, lambda r: gold_choice(r, experts))
        elif name == "merge_cat":
            out[name] = RoutedSystem(name, constant(uniform))
        elif name in ("moelora", "moelora_prior_nobias"):
            out[name] = RoutedSystem(name, constant(GATE), gate=gate_of(name))
        elif needs_router(name) and choices is None:
            raise ValueError(f"system {name!r} needs the router's decisions")
        elif (m := PRIOR_SYSTEM.fullmatch(name)) and choices is not None:
            setting = replace(
                prior,
                scale=float(m["scale"]) if m["scale"] else prior.scale,
                floor=float(m["floor"]) if m["floor"] else prior.floor,
                pool=m["pool"] or prior.pool,
            )
            out[name] = RoutedSystem(
                name,
                choices.prior(slots, setting),
                choices.live_prior(slots, setting),
                gate=gate_of(name),
            )
        elif name in ("router", "router_soft") and choices is not None:
            hard = name == "router"
            out[name] = RoutedSystem(
                name,
                choices.hard if hard else choices.soft,
                choices.live_hard if hard else choices.live_soft,
            )
    return out


class GateBank:
    """The trained gates of one MoE-LoRA model (``{name: gate folder}``), swapped in on demand
    (``use``); every gate is verified against the model's experts and config when loaded."""

    def __init__(self, model: Any, gates: Mapping[str, Path], active: str | None) -> None:
        self.model, self.gates, self.active = model, dict(gates), active

    def use(self, name: str | None) -> None:
        if name is None or name == self.active:
            return
        from moelora import load_gate

        load_gate(self.model, self.gates[name])
        self.active = name

    def each(self, systems: Mapping[str, RoutedSystem]) -> Iterator[tuple[str, RoutedSystem]]:
        """``systems`` in turn, each with its own trained gate in the model while it runs."""
        for name, system in systems.items():
            self.use(system.gate)
            yield name, system


@contextmanager
def routed_model(
    shared: SharedBase,
    adapters: Mapping[str, Path],
    with_gate: Path | None,
) -> Iterator[Any]:
    """One ``MoELoraModel`` over every expert on the shared base (with the trained gate from
    ``with_gate`` when a gated system is evaluated; else a fresh gate that no row uses)."""
    from moelora import MoELoraConfig, MoELoraModel, load_moelora

    with shared.lend("routed systems (one MoE-LoRA model)") as base:
        if with_gate is not None:
            model = load_moelora(base, with_gate, dict(adapters), shared.fingerprint)
        else:
            model = MoELoraModel.from_adapters(
                base, dict(adapters), MoELoraConfig(), shared.fingerprint
            )
        try:
            yield model.eval()
        finally:
            model.unload()


@contextmanager
def peft_system(
    name: str,
    shared: SharedBase,
    cfg: DictConfig,
    adapters: Mapping[str, Path],
    xlora_dir: str | Path | None,
) -> Iterator[ModelSystem]:
    """PEFT's TIES merge (only the merged adapter kept), X-LoRA (trained classifier, verified)
    or Arrow, on the shared base; unloaded at the end of the block."""
    experts = list(adapters)
    with shared.lend(name) as lent:
        base: Any = lent
        model: Any
        if name == "merge_ties":
            model = load_expert(base, dict(adapters), shared.fingerprint)
            model.add_weighted_adapter(
                experts,
                [float(cfg.eval.merges.ties_weight)] * len(experts),
                name,
                combination_type="ties_svd",
                density=float(cfg.eval.merges.ties_density),
            )
            model.set_adapter(name)
            for expert in experts:  # the merge alone is what a user of it holds
                model.delete_adapter(expert)
        elif name == "xlora":
            folder = need(xlora_dir, "trained X-LoRA classifier folder", name)
            model = build_xlora(base, adapters)
            load_xlora_classifier(model, folder, adapters, shared.fingerprint)
        elif name == "arrow":
            model = build_arrow(
                base, adapters, int(cfg.eval.arrow.top_k), float(cfg.eval.arrow.temperature)
            )
        else:
            raise ValueError(f"{name!r} is not a PEFT system {PEFT_SYSTEMS}")
        try:
            yield ModelSystem(name, model.eval())
        finally:
            model.unload()
