"""Build every system named in ``cfg.eval.systems`` over the same verified experts."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from loralab.artifacts import load_expert
from loralab.base_model import load_base_model
from loralab.baselines import build_arrow, build_xlora
from loralab.data.records import Record
from loralab.evaluation.systems import Choice, ModelSystem, RequestLevelSystem, System, gold_choice
from loralab.training.xlora import load_xlora_classifier

log = logging.getLogger(__name__)

REQUEST_LEVEL = ("base", "oracle", "merge_cat", "merge_ties", "router", "router_soft")
KNOWN = (*REQUEST_LEVEL, "moelora", "xlora", "arrow")


class RouterChoices:
    """Caches the request router's decisions per record id (``prepare`` routes a batch)."""

    def __init__(self, router_dir: str | Path, experts: Sequence[str]) -> None:
        import router

        self.router = router.load(router_dir)
        self.experts = list(experts)
        self.decisions: dict[str, Any] = {}

    def prepare(self, records: Sequence[Record]) -> None:
        todo = [r for r in records if r.id not in self.decisions]
        if todo:
            for r, d in zip(
                todo, self.router.route_batch([r.instruction for r in todo]), strict=True
            ):
                self.decisions[r.id] = d

    def hard(self, record: Record) -> Choice:
        label = self.decisions[record.id].label
        return label if label in self.experts else None

    def soft(self, record: Record) -> Choice:
        """The router's probabilities as merge weights; the ``base`` mass adds no adapter."""
        probs = self.decisions[record.id].probs
        if not probs:
            return None
        return {d: float(probs.get(d, 0.0)) for d in self.experts}


def constant_choice(choice: Choice) -> Callable[[Record], Choice]:
    return lambda record: choice


def check_names(names: Sequence[str], experts: Sequence[str]) -> None:
    allowed = {*KNOWN, *(f"expert_{d}" for d in experts)}
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ValueError(f"eval.systems: unknown system(s) {unknown}; known: {sorted(allowed)}")


def build_systems(
    cfg: DictConfig,
    adapters: Mapping[str, Path],
    fingerprint: str,
    router_dir: str | Path | None = None,
    moelora_dir: str | Path | None = None,
    xlora_dir: str | Path | None = None,
) -> tuple[dict[str, System], RouterChoices | None]:
    """Systems in ``cfg.eval.systems`` order; each needing a missing artifact raises a clear error."""
    names = [str(n) for n in cfg.eval.systems]
    experts = list(adapters)
    check_names(names, experts)
    cache = cfg.paths.cache_dir

    def need(path: Any, what: str, system: str) -> Path:
        if path is None or not Path(path).exists():
            raise FileNotFoundError(
                f"system {system!r} needs the {what} (got {path}); train it or drop the system"
            )
        return Path(path)

    systems: dict[str, System] = {}
    choices: RouterChoices | None = None
    if any(n in REQUEST_LEVEL or n.startswith("expert_") for n in names):
        bank = load_expert(
            load_base_model(cfg.base_model, cache)[0], dict(adapters), fingerprint
        ).eval()
        if "merge_cat" in names:
            bank.add_weighted_adapter(
                experts, [1.0 / len(experts)] * len(experts), "merge_cat", combination_type="cat"
            )
        if "merge_ties" in names:
            bank.add_weighted_adapter(
                experts,
                [float(cfg.eval.merges.ties_weight)] * len(experts),
                "merge_ties",
                combination_type="ties_svd",
                density=float(cfg.eval.merges.ties_density),
            )
        bank.eval()  # adapters added after .eval() come with dropout in training mode
        if "router" in names or "router_soft" in names:
            choices = RouterChoices(need(router_dir, "router folder", "router"), experts)
        for name in names:
            if name == "base":
                systems[name] = RequestLevelSystem(name, bank, constant_choice(None))
            elif name.startswith("expert_"):
                systems[name] = RequestLevelSystem(
                    name, bank, constant_choice(name.removeprefix("expert_"))
                )
            elif name == "oracle":
                systems[name] = RequestLevelSystem(name, bank, lambda r: gold_choice(r, experts))
            elif name in ("merge_cat", "merge_ties"):
                systems[name] = RequestLevelSystem(name, bank, constant_choice(name))
            elif name in ("router", "router_soft") and choices is not None:
                choose = choices.hard if name == "router" else choices.soft
                systems[name] = RequestLevelSystem(name, bank, choose, choices.prepare)
    for name in names:
        if name == "moelora":
            from moelora import load_moelora

            gate = need(moelora_dir, "trained MoE-LoRA gate folder", name)
            base = load_base_model(cfg.base_model, cache)[0]
            systems[name] = ModelSystem(
                name, load_moelora(base, gate, dict(adapters), fingerprint).eval()
            )
        elif name == "xlora":
            folder = need(xlora_dir, "trained X-LoRA classifier folder", name)
            model = build_xlora(load_base_model(cfg.base_model, cache)[0], adapters)
            load_xlora_classifier(model, folder, adapters, fingerprint)
            systems[name] = ModelSystem(name, model.eval())
        elif name == "arrow":
            model = build_arrow(
                load_base_model(cfg.base_model, cache)[0],
                adapters,
                int(cfg.eval.arrow.top_k),
                float(cfg.eval.arrow.temperature),
            )
            systems[name] = ModelSystem(name, model.eval())
    return {n: systems[n] for n in names}, choices
