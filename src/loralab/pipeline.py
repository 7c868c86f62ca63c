"""The main job: experts -> router -> MoE-LoRA gate (+ X-LoRA baseline) -> evaluation -> report.

Each training stage is composed once from its own top-level config (the same one its script uses)
with the pipeline's experiment and the user's overrides, and writes under ``<run dir>/<stage>/``;
the artifact folders are defined once, in ``STAGE_ARTIFACTS``. A stage whose artifact is already complete there is reused (verified),
unless it is listed in ``pipeline.retrain``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, open_dict

from loralab.evaluation.harness import evaluate
from loralab.io_utils import exclusive_run_dir
from loralab.training.xlora import XLORA_MANIFEST_FILE

log = logging.getLogger(__name__)

STAGE_CONFIGS = {
    "experts": "train_experts",
    "router": "train_router",
    "moelora": "train_moelora",
    "xlora": "train_moelora",
}
STAGES = (*STAGE_CONFIGS, "evaluate")
# Where each stage's artifact lands under the pipeline's run dir: the one definition of these paths
# (the stage functions write <stage run dir>/<name> and return it; checked against this below).
STAGE_ARTIFACTS = {
    "experts": "experts/adapters",
    "router": "router/router",
    "moelora": "moelora/moelora",
    "xlora": "xlora/xlora",
}
_PIPELINE_ONLY = ("experiment", "hydra", "pipeline", "eval", "experts_dir", "router_dir",
                  "moelora_dir", "xlora_dir")  # fmt: skip


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
    """
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra

    repository = GlobalHydra.instance().config_loader().repository  # type: ignore[attr-defined]
    forwarded = [
        o if repository.group_exists(override_key(o)) else "++" + o.lstrip("+")  # logger=wandb
        for o in user_overrides
        if not o.startswith("~") and not override_key(o).startswith(_PIPELINE_ONLY)
    ]
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


def _run_pipeline(
    cfg: DictConfig, experiment: str, user_overrides: Sequence[str]
) -> dict[str, Any]:
    unknown = set(cfg.pipeline.stages) - set(STAGES)
    if unknown:
        raise ValueError(f"pipeline.stages: unknown {sorted(unknown)}; known: {list(STAGES)}")
    out = Path(cfg.paths.output_dir)
    dirs = artifact_dirs(out)
    with open_dict(cfg):
        cfg.experts_dir, cfg.router_dir = str(dirs["experts"]), str(dirs["router"])
        cfg.moelora_dir, cfg.xlora_dir = str(dirs["moelora"]), str(dirs["xlora"])
    stages = list(cfg.pipeline.stages)
    if "evaluate" in stages:  # a bad benchmark or extra-set file stops the run before training
        from loralab.evaluation.benchmarks import choice_sets

        choice_sets(cfg.data, cfg.eval)
    if "experts" in stages:
        from loralab.training.train_experts import train_experts

        extra = ["expert.check=false", f"expert.retrain={str(_retrain(cfg, 'experts')).lower()}"]
        done = train_experts(
            compose_stage("train_experts", experiment, user_overrides, out / "experts", extra)
        )
        for path in done["adapters"].values():
            _same("experts", Path(path).parent, dirs["experts"])
    if "router" in stages and (_retrain(cfg, "router") or not dirs["router"].is_dir()):
        from loralab.routing import train_router

        stage_cfg = compose_stage("train_router", experiment, user_overrides, out / "router")
        _same("router", train_router(stage_cfg)["router_dir"], dirs["router"])
    if "moelora" in stages and (_retrain(cfg, "moelora") or not dirs["moelora"].is_dir()):
        from loralab.training.moelora_gate import train_moelora

        extra = [
            f"experts_dir={dirs['experts']}",
            f"retrain={str(_retrain(cfg, 'moelora')).lower()}",
        ]
        stage_cfg = compose_stage(
            "train_moelora", experiment, user_overrides, out / "moelora", extra
        )
        _same("moelora", train_moelora(stage_cfg)["gate_dir"], dirs["moelora"])
    if "xlora" in stages and (
        _retrain(cfg, "xlora") or not (dirs["xlora"] / XLORA_MANIFEST_FILE).is_file()
    ):
        from loralab.training.xlora import train_xlora

        extra = [f"experts_dir={dirs['experts']}", f"retrain={str(_retrain(cfg, 'xlora')).lower()}"]
        stage_cfg = compose_stage("train_moelora", experiment, user_overrides, out / "xlora", extra)
        adapters = {str(d): dirs["experts"] / str(d) for d in cfg.data.domains}
        _same("xlora", train_xlora(stage_cfg, adapters, out / "xlora"), dirs["xlora"])
    if "evaluate" not in stages:
        return {}
    return evaluate_and_report(cfg)


def evaluate_and_report(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate, then write results.json / results.csv / report.md / plots and log to the trackers."""
    from loralab.evaluation.report import write_report, write_results

    out = Path(cfg.paths.output_dir)
    results = evaluate(cfg, cfg.experts_dir, cfg.router_dir, cfg.moelora_dir, cfg.xlora_dir)
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
