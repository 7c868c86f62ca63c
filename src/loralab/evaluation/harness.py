"""Run every system on every evaluation set and collect the results dict (schema: ``report.py``;
the summaries computed at the end: ``results.py``).

The base model is loaded once. Systems are built on it group by group (``build.groups``): the
request-level systems and MoE-LoRA on one MoE-LoRA model, then each PEFT system; each group scores
every set, generates, measures its cost, and is torn down before the next (the base is checked
unchanged after each).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning import seed_everything
from omegaconf import DictConfig

from loralab.artifacts import verify_adapter
from loralab.base_model import load_base_model, resolve_device, weights_fingerprint
from loralab.data.records import Record
from loralab.evaluation.build import (
    PRIOR_SYSTEM,
    GateBank,
    PriorSetting,
    RouterChoices,
    check_names,
    chosen_systems,
    expand_systems,
    gate_of,
    groups,
    is_routed,
    need,
    needs_router,
    peft_system,
    routed_model,
    routed_systems,
)
from loralab.evaluation.cost import (
    Served,
    cost_metrics,
    cost_prompts,
    costed_systems,
    measure_cost,
    served_model,
    served_routed,
)
from loralab.evaluation.generation import Generator, generation_sets
from loralab.evaluation.results import (
    evaluated_artifacts,
    final_metrics,
    paired_nll_tests,
    provenance,
    routing_summary,
)
from loralab.evaluation.sandbox import isolation
from loralab.evaluation.scoring import GateRecorder, RoutedScorer, Scored, score_model
from loralab.evaluation.sets import EvalSet, build_eval_sets
from loralab.evaluation.shared_base import SharedBase
from loralab.evaluation.stats import nll_metrics
from loralab.evaluation.tasks import TaskScores, load_choice_sets
from loralab.measurement import (
    allocator_in_use,
    definition,
    materialize_weights,
    process_peak_rss_bytes,
    reset_peak_rss,
    set_threads,
)

log = logging.getLogger(__name__)


class _Run:
    """What one evaluation accumulates, system by system."""

    def __init__(self, cfg: DictConfig, sets: Mapping[str, EvalSet], tasks: TaskScores) -> None:
        self.cfg = cfg
        self.sets = sets
        self.tasks = tasks  # multiple-choice accuracy and pass rates
        self.per_example: dict[str, dict[str, Scored]] = {}
        self.metrics: list[dict[str, Any]] = []
        self.generations: dict[str, Any] = {}
        self.gate: dict[str, Any] | None = None
        self.seconds: dict[str, dict[str, float]] = {}

    def scored(self, name: str, per_set: dict[str, Scored]) -> None:
        boot = self.cfg.eval.bootstrap
        self.per_example[name] = per_set
        for set_name, scored in per_set.items():
            self.metrics.extend(
                nll_metrics(
                    name,
                    set_name,
                    scored["nll_sum"],
                    scored["n_tokens"],
                    int(boot.n),
                    int(boot.seed),
                    float(boot.alpha),
                )
            )

    def timed(self, group: str, stage: str, started: float) -> None:
        self.seconds.setdefault(group, {})[stage] = round(time.perf_counter() - started, 2)


def evaluate(
    cfg: DictConfig,
    experts_dir: str | Path,
    router_dir: str | Path | None = None,
    moelora_dir: str | Path | None = None,
    xlora_dir: str | Path | None = None,
    moelora_prior_dir: str | Path | None = None,
) -> dict[str, Any]:
    """The head-to-head comparison: every system in ``cfg.eval.systems`` on every set."""
    seed_everything(int(cfg.seed), workers=True)
    started = time.perf_counter()
    rss_reset = reset_peak_rss()  # the evaluation's own peak, not the training stages' before it
    threads = set_threads(cfg.eval.cost.get("threads"))
    device = resolve_device(cfg.base_model.get("device", "auto"))
    experts = [str(d) for d in cfg.data.domains]
    names = expand_systems([str(n) for n in cfg.eval.systems], experts)
    check_names(names, experts)
    costed = costed_systems(cfg.eval.cost, names, experts)
    base, tokenizer = load_base_model(cfg.base_model, cfg.paths.cache_dir)
    materialize_weights(base)  # the CPU peak memory then counts the weights, as CUDA's does
    shared = SharedBase(base, weights_fingerprint(base))
    adapters = {d: Path(experts_dir) / d for d in experts}
    manifests = {d: verify_adapter(path, shared.fingerprint) for d, path in adapters.items()}
    pad_id = int(tokenizer.pad_token_id)
    sets = build_eval_sets(cfg.data, cfg.eval, tokenizer, experts)
    tasks = TaskScores(load_choice_sets(cfg, tokenizer, router_dir), cfg.eval.bootstrap)
    gen = cfg.eval.generation
    generator = None
    mbpp, humaneval = int(gen.get("mbpp") or 0), int(gen.get("humaneval") or 0)
    if int(gen.per_set or 0) > 0 or mbpp or humaneval:
        generator = Generator(
            generation_sets(
                cfg.data,
                int(gen.per_set or 0),
                experts,
                mbpp,
                humaneval,
                str(gen.humaneval_path),
            ),
            tokenizer,
            gen,
            int(cfg.eval.batch_size),
            device,
        )
    generated = (
        set()
        if generator is None
        else chosen_systems("eval.generation.systems", gen.get("systems"), names, experts)
    )
    cost = cfg.eval.cost
    prompts: tuple[torch.Tensor, list[Record]] | None = None
    if cost.enabled:
        prompts = cost_prompts(sets, int(cost.prompt_tokens), int(cost.batch_size), device)
    run = _Run(cfg, sets, tasks)
    # What the process holds before any system is built (the base model, data, tokenizer): the
    # part of every absolute peak-memory figure that is not the system's own.
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else allocator_in_use()
    choices: RouterChoices | None = None
    for group in groups(names):
        group_started = time.perf_counter()
        if is_routed(group[0]):
            if any(needs_router(n) for n in group):
                choices = RouterChoices(need(router_dir, "router folder", "router"), experts)
                records = [r for s in (*sets.values(), *tasks.rows.values()) for r in s.records]
                if generator is not None:
                    records += [i.record for items in generator.sets.values() for i in items]
                segments = any(PRIOR_SYSTEM.fullmatch(n) for n in group)
                choices.prepare(records + (prompts[1] if prompts else []), segments)
            folders = {"moelora": moelora_dir, "moelora_prior": moelora_prior_dir}
            gates = {
                g: need(folders[g], f"trained {g} gate folder", n)
                for n in group
                if (g := gate_of(n)) is not None
            }
            _routed_group(
                run, group, shared, adapters, gates, choices, generator, generated,
                prompts if costed.intersection(group) else None, costed, tokenizer, pad_id, device,
            )  # fmt: skip
            if choices is not None:
                choices.release()
        else:
            name = group[0]
            _peft_group(
                run, name, shared, adapters, xlora_dir,
                generator if name in generated else None,
                prompts if name in costed else None, pad_id, device,
            )  # fmt: skip
        log.info("%s: done in %.0f s", "+".join(group), time.perf_counter() - group_started)
    routing: dict[str, Any] = {}
    if choices is not None:
        routing["router"] = routing_summary(choices, sets, experts)
    if run.gate is not None:
        routing["moelora"] = run.gate
    pairs = [(str(a), str(b)) for a, b in cfg.eval.paired_tests]
    peak_rss = process_peak_rss_bytes()
    return {
        **provenance(cfg, device, threads),
        "domains": experts,
        "systems": names,
        "sets": list(sets),
        "n_examples": {name: len(s.records) for name, s in sets.items()},
        "metrics": final_metrics(run.metrics, names),
        "per_example": {n: run.per_example[n] for n in names if n in run.per_example},
        "paired_tests": paired_nll_tests(run.per_example, pairs, cfg.eval.bootstrap),
        **tasks.results(names, pairs),
        "routing": routing,
        "generations": {n: run.generations[n] for n in names if n in run.generations},
        "base_fingerprint": shared.fingerprint,
        "artifacts": evaluated_artifacts(
            manifests, names, choices, moelora_dir, xlora_dir, moelora_prior_dir
        ),
        "sandbox": isolation() if generator is not None else None,
        "measurement": {
            **definition(device, int(cost.repeats), 1, threads),
            "batch_size": int(cost.batch_size),
            "prompt_tokens": int(cost.prompt_tokens),
            "new_tokens": int(cost.new_tokens),
            "allocated_before_systems_mb": None if before is None else round(before / 2**20, 1),
        },
        "seconds": run.seconds,
        "peak_rss_mb": None if peak_rss is None else round(peak_rss / 2**20, 1),
        "peak_rss_since": "evaluation start" if rss_reset else "process start",
        "elapsed_s": time.perf_counter() - started,
    }


def _routed_group(
    run: _Run,
    names: Sequence[str],
    shared: SharedBase,
    adapters: Mapping[str, Path],
    gates: Mapping[str, Path],
    choices: RouterChoices | None,
    generator: Generator | None,
    generated: set[str],
    prompts: tuple[torch.Tensor, list[Record]] | None,
    costed: set[str],
    tokenizer: Any,
    pad_id: int,
    device: torch.device,
) -> None:
    """Every routed system on one MoE-LoRA model: score, generate (those in ``generated``), cost
    (those in ``costed``); then unload."""
    cfg = run.cfg
    label = "routed"
    first = next(iter(gates), None)
    with routed_model(shared, adapters, None if first is None else gates[first]) as model:
        bank = GateBank(model, gates, first)
        prior = prior_setting(cfg, gates.get("moelora_prior"))
        systems = routed_systems(names, list(adapters), choices, model.gate_slot_names, prior)
        started = time.perf_counter()
        scorer = RoutedScorer(model, run.sets, int(cfg.eval.batch_size), pad_id, device)
        scorer.fill(list(systems.values()))  # the single choices of every system, once
        for name, system in bank.each(systems):
            recorder = None
            if name == "moelora":
                recorder = GateRecorder(model.slot_names, int(cfg.eval.heatmap_examples), tokenizer)
            run.scored(name, scorer.score(system, recorder))
            if recorder is not None:
                run.gate = recorder.summary()
        log.info("routed systems scored with %d forwards", scorer.forwards)
        run.timed(label, "score", started)
        if run.tasks.sets:  # multiple choice: option rows, same scorer, one choice per question
            started = time.perf_counter()
            rows = RoutedScorer(model, run.tasks.rows, int(cfg.eval.batch_size), pad_id, device)
            rows.fill(list(systems.values()))
            for name, system in bank.each(systems):  # a gated row runs its own gate here
                run.metrics.extend(run.tasks.answered(name, rows.score(system)))
            log.info("option rows: %d forwards, %d tokens", rows.forwards, rows.tokens)
            run.timed(label, "choices", started)
        if generator is not None and generated.intersection(systems):
            started = time.perf_counter()
            for name, system in bank.each({n: s for n, s in systems.items() if n in generated}):
                run.generations[name] = generator.routed(model, system)
                run.metrics.extend(run.tasks.generated(name, run.generations[name]))
            run.timed(label, "generate", started)
        if prompts is not None:
            started = time.perf_counter()
            for name, system in bank.each({n: s for n, s in systems.items() if n in costed}):
                _measure_cost(run, name, served_routed(model, system, prompts[1]), prompts)
            run.timed(label, "cost", started)


def prior_setting(cfg: DictConfig, prior_gate: Path | None) -> PriorSetting:
    """The router prior's setting: what the prior gate was trained with (its training.json; a
    gate from before pooling was trained on whole requests), else ``moelora.prior`` of the config."""
    if prior_gate is not None and (prior_gate / "training.json").is_file():
        trained = json.loads((prior_gate / "training.json").read_text(encoding="utf-8"))["prior"]
        if trained:
            pool = str(trained.get("pool", "request"))
            return PriorSetting(float(trained["scale"]), float(trained["floor"]), pool)
    p = cfg.get("moelora", {}).get("prior") or {}
    default = PriorSetting()
    return PriorSetting(
        float(p.get("scale", default.scale)),
        float(p.get("floor", default.floor)),
        str(p.get("pool", default.pool)),
    )


def _peft_group(
    run: _Run,
    name: str,
    shared: SharedBase,
    adapters: Mapping[str, Path],
    xlora_dir: str | Path | None,
    generator: Generator | None,
    prompts: tuple[torch.Tensor, list[Record]] | None,
    pad_id: int,
    device: torch.device,
) -> None:
    """One PEFT system on the shared base: score, generate, cost; then unload."""
    cfg = run.cfg
    with peft_system(name, shared, cfg, adapters, xlora_dir) as system:
        started = time.perf_counter()
        run.scored(name, score_model(system, run.sets, int(cfg.eval.batch_size), pad_id, device))
        run.timed(name, "score", started)
        if run.tasks.sets:
            started = time.perf_counter()
            rows = score_model(system, run.tasks.rows, int(cfg.eval.batch_size), pad_id, device)
            run.metrics.extend(run.tasks.answered(name, rows))
            run.timed(name, "choices", started)
        if generator is not None:
            started = time.perf_counter()
            run.generations[name] = generator.model(system)
            run.metrics.extend(run.tasks.generated(name, run.generations[name]))
            run.timed(name, "generate", started)
        if prompts is not None:
            started = time.perf_counter()
            _measure_cost(run, name, served_model(system), prompts)
            run.timed(name, "cost", started)


def _measure_cost(
    run: _Run, name: str, served: Served, prompts: tuple[torch.Tensor, list[Record]]
) -> None:
    ids, records = prompts
    cost = run.cfg.eval.cost
    values = measure_cost(served, ids, records, int(cost.new_tokens), int(cost.repeats))
    run.metrics.extend(cost_metrics(name, values))
