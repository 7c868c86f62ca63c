"""The main job: experts -> router -> MoE-LoRA gate (+ X-LoRA baseline) -> evaluation -> report.

Each training stage is composed once from its own top-level config (the same one its script uses)
with the pipeline's experiment and the user's overrides, and writes under ``<run dir>/<stage>/``;
the artifact folders are defined once, in ``STAGE_ARTIFACTS``. A stage whose artifact is already
complete there is reused (verified), unless it is listed in ``pipeline.retrain``.

``data.domains`` decides the experts. A domain added to a finished run trains only its own expert
(the others are verified and reused), refits the router (labels changed; cached embeddings, only
the new label's texts are encoded) and grows the gate: the old experts' gate rows are loaded into
a wider gate (``moelora.load_gate(..., allow_new_experts=True)``), then trained for
``pipeline.grow_gate_steps``. What each step did and how long it took is appended to
``<run dir>/pipeline_steps.json``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, open_dict

from loralab.data.records import router_labels
from loralab.evaluation.harness import evaluate
from loralab.io_utils import atomic_write_json, exclusive_run_dir
from loralab.training.xlora import XLORA_MANIFEST_FILE

log = logging.getLogger(__name__)

STAGE_CONFIGS = {
    "experts": "train_experts",
    "router": "train_router",
    "moelora": "train_moelora",
    "moelora_prior": "train_moelora",
    "xlora": "train_moelora",
}
STAGES = (*STAGE_CONFIGS, "evaluate")
# Where each stage's artifact lands under the pipeline's run dir: the one definition of these paths
# (the stage functions write <stage run dir>/<name> and return it; checked against this below).
STAGE_ARTIFACTS = {
    "experts": "experts/adapters",
    "router": "router/router",
    "moelora": "moelora/moelora",
    "moelora_prior": "moelora_prior/moelora",
    "xlora": "xlora/xlora",
}
_PIPELINE_ONLY = ("experiment", "hydra", "pipeline", "eval", "experts_dir", "router_dir",
                  "moelora_dir", "moelora_prior_dir", "xlora_dir")  # fmt: skip
STEPS_FILE = "pipeline_steps.json"


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def artifact_dirs(out: str | Path) -> dict[str, Path]:
    """``{stage: artifact folder}`` of a pipeline run dir."""
    return {stage: Path(out) / sub for stage, sub in STAGE_ARTIFACTS.items()}


def compose_stage(
    config_name: str,
    experiment: str,
    user_overrides: Sequence[str],
    output_dir: Path,
    extra: Sequence[str] = (),
) -> DictConfig:
    """``config_name`` composed once, like its own script would be, writing to ``output_dir``.

    The user's overrides were validated against ``run_pipeline.yaml`` (which holds every stage's
    groups); each is passed with ``++`` so that a key another stage owns (``expert.lora.r`` for the
    router) adds an unused key instead of failing, while ``moelora.gate.top_k=2`` reaches the gate.
    A group choice (``logger=wandb``, ``router=minilm``) goes to the stages whose config has the
    group.
    """
    from hydra import compose
    from hydra.core.default_element import GroupDefault
    from hydra.core.global_hydra import GlobalHydra

    repository = GlobalHydra.instance().config_loader().repository  # type: ignore[attr-defined]
    loaded = repository.load_config(config_name)
    groups = {d.group for d in loaded.defaults_list if isinstance(d, GroupDefault)}
    forwarded = []
    for o in user_overrides:
        key = override_key(o)
        if o.startswith("~") or key.startswith(_PIPELINE_ONLY):
            continue
        if not repository.group_exists(key):
            forwarded.append("++" + o.lstrip("+"))
        elif key.split("/")[0] in groups:
            forwarded.append(o)
    cfg = compose(
        config_name=config_name, overrides=[f"experiment={experiment}", *forwarded, *extra]
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def _retrain(cfg: DictConfig, stage: str) -> bool:
    retrain = [str(s) for s in cfg.pipeline.retrain]
    return "all" in retrain or stage in retrain


def _same(stage: str, written: str | Path, expected: Path) -> None:
    if Path(written).resolve() != expected.resolve():
        raise RuntimeError(f"stage {stage} wrote {written}, the pipeline expects {expected}")


def run_pipeline(cfg: DictConfig, experiment: str, user_overrides: Sequence[str]) -> dict[str, Any]:
    """Run the stages in ``cfg.pipeline.stages`` and return the evaluation results."""
    with exclusive_run_dir(cfg.paths.output_dir):
        return _run_pipeline(cfg, experiment, user_overrides)


def saved_router_labels(router_dir: Path) -> list[str] | None:
    """The labels of the router saved in ``router_dir`` (its router.json), None if there is none."""
    path = router_dir / "router.json"
    if not path.is_file():
        return None
    return [str(x) for x in json.loads(path.read_text(encoding="utf-8"))["labels"]]


def router_encoder_changed(router_dir: Path) -> str | None:
    """Why the saved router no longer loads with its encoder (its fingerprint or probe embeddings
    differ: the encoder's weights or how it encodes changed), None when it loads."""
    import router

    try:
        router.load(router_dir)
    except router.EncoderMismatchError as error:
        return str(error)
    return None


def prior_router_changed(gate_dir: Path, router_dir: Path) -> bool:
    """Whether the gate in ``gate_dir`` was trained with the prior of another router version than
    the one saved in ``router_dir``."""
    training, saved = gate_dir / "training.json", router_dir / "router.json"
    if not training.is_file() or not saved.is_file():
        return False
    prior = json.loads(training.read_text(encoding="utf-8")).get("prior") or {}
    version = json.loads(saved.read_text(encoding="utf-8")).get("model_version")
    return prior.get("router_model_version") != version


def saved_gate_experts(gate_dir: Path) -> list[str] | None:
    """The expert names of the gate saved in ``gate_dir``, None if there is none."""
    from moelora import read_gate_metadata

    if not (gate_dir / "moelora.json").is_file():
        return None
    return [str(e["name"]) for e in read_gate_metadata(gate_dir)["experts"]]


def saved_xlora_experts(xlora_dir: Path) -> list[str] | None:
    path = xlora_dir / XLORA_MANIFEST_FILE
    if not path.is_file():
        return None
    return [str(e["name"]) for e in json.loads(path.read_text(encoding="utf-8"))["experts"]]


class _Steps:
    """What each stage of this run did (trained / reused / refit / grown) and its seconds,
    appended to ``<run dir>/pipeline_steps.json`` as the run goes (one entry per run)."""

    def __init__(self, out: Path, domains: Sequence[str]) -> None:
        self.path = out / STEPS_FILE
        previous = json.loads(self.path.read_text()) if self.path.is_file() else {"runs": []}
        self.runs: list[dict[str, Any]] = list(previous.get("runs", []))
        self.current: dict[str, Any] = {"domains": list(domains), "steps": {}}
        self.runs.append(self.current)

    def record(self, stage: str, started: float, **facts: Any) -> None:
        seconds = round(time.perf_counter() - started, 2)
        self.current["steps"][stage] = {**facts, "seconds": seconds}
        log.info("pipeline step %s: %s in %.1f s", stage, json.dumps(facts), seconds)
        atomic_write_json(self.path, {"runs": self.runs})


def _run_pipeline(
    cfg: DictConfig, experiment: str, user_overrides: Sequence[str]
) -> dict[str, Any]:
    unknown = set(cfg.pipeline.stages) - set(STAGES)
    if unknown:
        raise ValueError(f"pipeline.stages: unknown {sorted(unknown)}; known: {list(STAGES)}")
    out = Path(cfg.paths.output_dir)
    dirs = artifact_dirs(out)
    domains = [str(d) for d in cfg.data.domains]
    labels = router_labels(domains)  # checks the names
    steps = _Steps(out, domains)
    with open_dict(cfg):
        cfg.experts_dir, cfg.router_dir = str(dirs["experts"]), str(dirs["router"])
        cfg.moelora_dir, cfg.xlora_dir = str(dirs["moelora"]), str(dirs["xlora"])
        cfg.moelora_prior_dir = str(dirs["moelora_prior"])
    stages = list(cfg.pipeline.stages)
    if "evaluate" in stages:  # a bad benchmark or extra-set file stops the run before training
        from loralab.evaluation.benchmarks import choice_sets

        choice_sets(cfg.data, cfg.eval)
        _check_artifacts_for(cfg, stages, dirs, domains)
    if "experts" in stages:
        from loralab.training.train_experts import train_experts

        started = time.perf_counter()
        extra = ["expert.check=false", f"expert.retrain={str(_retrain(cfg, 'experts')).lower()}"]
        done = train_experts(
            compose_stage("train_experts", experiment, user_overrides, out / "experts", extra)
        )
        for path in done["adapters"].values():
            _same("experts", Path(path).parent, dirs["experts"])
        steps.record(
            "experts", started, trained=done["trained"], reused=done["reused"],
            seconds_per_expert=done["seconds"],
        )  # fmt: skip
    if "router" in stages:
        saved = saved_router_labels(dirs["router"])
        stale = None if saved is None else router_encoder_changed(dirs["router"])
        if stale is not None:
            log.warning("%s: trained again, the router no longer loads: %s", dirs["router"], stale)
        if _retrain(cfg, "router") or saved != labels or stale is not None:
            from loralab.routing import train_router

            started = time.perf_counter()
            stage_cfg = compose_stage("train_router", experiment, user_overrides, out / "router")
            done = train_router(stage_cfg)
            _same("router", done["router_dir"], dirs["router"])
            anew = saved is None or _retrain(cfg, "router") or stale is not None
            action = "trained" if anew else "refit"
            steps.record(
                "router", started, action=action, labels=labels, previous_labels=saved,
                encoded_texts=done["metrics"]["encoded_texts"],
            )  # fmt: skip
        else:
            steps.record("router", time.perf_counter(), action="reused", labels=labels)
    for gate_stage in ("moelora", "moelora_prior"):
        if gate_stage in stages:
            _gate_stage(gate_stage, cfg, experiment, user_overrides, dirs, domains, steps)
    if "xlora" in stages:
        saved_x = saved_xlora_experts(dirs["xlora"])
        if _retrain(cfg, "xlora") or saved_x != domains:
            from loralab.training.xlora import train_xlora

            started = time.perf_counter()
            retrain = _retrain(cfg, "xlora") or saved_x is not None  # experts changed: anew
            extra = [f"experts_dir={dirs['experts']}", f"retrain={str(retrain).lower()}"]
            stage_cfg = compose_stage(
                "train_moelora", experiment, user_overrides, out / "xlora", extra
            )
            adapters = {d: dirs["experts"] / d for d in domains}
            _same("xlora", train_xlora(stage_cfg, adapters, out / "xlora"), dirs["xlora"])
            steps.record("xlora", started, action="trained", previous_experts=saved_x)
        else:
            steps.record("xlora", time.perf_counter(), action="reused")
    if "evaluate" not in stages:
        return {}
    started = time.perf_counter()
    results = evaluate_and_report(cfg)
    steps.record("evaluate", started, systems=results["systems"], sets=results["sets"])
    return results


def stages_read(systems: Sequence[str], domains: Sequence[str]) -> dict[str, list[str]]:
    """Each evaluated system (``expert_*`` expanded) -> the training stages whose artifacts it runs
    on, besides the experts (``router``, ``moelora``, ``moelora_prior``, ``xlora``)."""
    from loralab.evaluation.build import expand_systems, gate_of, needs_router

    out = {}
    for name in expand_systems([str(n) for n in systems], list(domains)):
        needed = {gate_of(name), "router" if needs_router(name) else None}
        needed |= {"xlora"} if name == "xlora" else set()
        out[name] = sorted(s for s in needed if s is not None)
    return out


def _check_artifacts_for(
    cfg: DictConfig, stages: Sequence[str], dirs: dict[str, Path], domains: list[str]
) -> None:
    """Every artifact ``eval.systems`` runs on is trained by a stage of this run or was left in the
    run folder by an earlier one: checked before any training, not after it."""
    saved = {
        "router": saved_router_labels,
        "moelora": saved_gate_experts,
        "moelora_prior": saved_gate_experts,
        "xlora": saved_xlora_experts,
    }
    for name, needed in stages_read(cfg.eval.systems, domains).items():
        for stage in needed:
            if stage not in stages and saved[stage](dirs[stage]) is None:
                raise ValueError(
                    f"eval.systems: {name!r} needs the {stage!r} artifacts, which "
                    f"pipeline.stages {list(stages)} does not train and {dirs[stage]} does not "
                    f"hold: add {stage!r} to pipeline.stages or leave {name!r} out of eval.systems"
                )


def _gate_stage(
    stage: str,
    cfg: DictConfig,
    experiment: str,
    user_overrides: Sequence[str],
    dirs: dict[str, Path],
    domains: list[str],
    steps: _Steps,
) -> None:
    """Train a gate (``moelora``; ``moelora_prior``: with the router's prior in place), reuse it,
    or grow it over new experts (warm start, then a short training)."""
    out = Path(cfg.paths.output_dir) / stage
    saved = saved_gate_experts(dirs[stage])
    retrain = _retrain(cfg, stage)
    if (
        stage == "moelora_prior"
        and saved == domains
        and prior_router_changed(dirs[stage], dirs["router"])
    ):
        log.info("%s: trained again, its prior's router has changed", dirs[stage])
        retrain = True
    if saved == domains and not retrain:
        steps.record(stage, time.perf_counter(), action="reused", experts=domains)
        return
    from loralab.training.moelora_gate import train_moelora

    started = time.perf_counter()
    grow = saved is not None and not retrain and set(saved) < set(domains)
    extra = [
        f"experts_dir={dirs['experts']}",
        f"retrain={str(retrain or saved is not None).lower()}",
    ]
    if stage == "moelora_prior":
        extra += ["moelora.prior.enabled=true", f"router_dir={dirs['router']}"]
    if grow:
        extra.append(f"init_gate={dirs[stage]}")
        if cfg.pipeline.get("grow_gate_steps") is not None:
            extra.append(f"trainer.max_steps={int(cfg.pipeline.grow_gate_steps)}")
    stage_cfg = compose_stage("train_moelora", experiment, user_overrides, out, extra)
    done = train_moelora(stage_cfg)
    _same(stage, done["gate_dir"], dirs[stage])
    steps.record(
        stage, started, action="grown" if grow else "trained", experts=domains,
        previous_experts=saved, kept_experts=saved if grow else [],
        global_step=done["global_step"],
    )  # fmt: skip


def evaluate_and_report(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate, then write results.json / results.csv / report.md / plots and log to the trackers."""
    from loralab.evaluation.report import write_report, write_results

    out = Path(cfg.paths.output_dir)
    results = evaluate(
        cfg,
        cfg.experts_dir,
        cfg.router_dir,
        cfg.moelora_dir,
        cfg.xlora_dir,
        moelora_prior_dir=cfg.get("moelora_prior_dir"),
    )
    written = write_results(results, out) + write_report(results, out)
    log.info("wrote %s", ", ".join(str(p.relative_to(out)) for p in written))
    plots = [p for p in written if p.suffix == ".png"]
    if cfg.get("logger") and "wandb" in cfg.logger:
        from loralab.evaluation.wandb_report import log_results_to_wandb

        w = cfg.logger.wandb
        log_results_to_wandb(
            results,
            out,
            plots,
            project=w.project,
            group=w.group,
            tags=list(w.tags or []),
            offline=bool(w.offline),
        )
    return results
