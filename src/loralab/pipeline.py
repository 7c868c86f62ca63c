"""The main job: experts -> router -> MoE-LoRA gate (+ X-LoRA baseline) -> evaluation -> report.

Each training stage is composed from its own top-level config (the same one its script uses) with
the pipeline's experiment and those of the user's overrides that exist in it, and writes under
``<run dir>/<stage>/``. A stage whose artifact is already complete there is reused (verified),
unless it is listed in ``pipeline.retrain``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from loralab.evaluation.harness import evaluate
from loralab.training.xlora import XLORA_MANIFEST_FILE

log = logging.getLogger(__name__)

STAGE_CONFIGS = {
    "experts": "train_experts",
    "router": "train_router",
    "moelora": "train_moelora",
    "xlora": "train_moelora",
}
STAGES = (*STAGE_CONFIGS, "evaluate")


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def compose_stage(
    config_name: str,
    experiment: str,
    user_overrides: Sequence[str],
    output_dir: Path,
    extra: Sequence[str] = (),
) -> DictConfig:
    """``config_name`` composed like its own script would be, writing to ``output_dir``.

    User overrides are passed on when their key exists in that config (so ``expert.lora.r=32``
    reaches the experts stage only, ``data.max_length=...`` every stage).
    """
    from hydra import compose

    plain = compose(config_name=config_name, overrides=[f"experiment={experiment}"])
    keep = [
        o
        for o in user_overrides
        if not override_key(o).startswith(
            (
                "experiment",
                "hydra",
                "pipeline",
                "eval",
                "experts_dir",
                "router_dir",
                "moelora_dir",
                "xlora_dir",
            )
        )
        and OmegaConf.select(plain, override_key(o), default="<absent>") != "<absent>"
    ]
    cfg = compose(config_name=config_name, overrides=[f"experiment={experiment}", *keep, *extra])
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def _retrain(cfg: DictConfig, stage: str) -> bool:
    retrain = [str(s) for s in cfg.pipeline.retrain]
    return "all" in retrain or stage in retrain


def run_pipeline(cfg: DictConfig, experiment: str, user_overrides: Sequence[str]) -> dict[str, Any]:
    """Run the stages in ``cfg.pipeline.stages`` and return the evaluation results."""
    unknown = set(cfg.pipeline.stages) - set(STAGES)
    if unknown:
        raise ValueError(f"pipeline.stages: unknown {sorted(unknown)}; known: {list(STAGES)}")
    out = Path(cfg.paths.output_dir)
    stages = list(cfg.pipeline.stages)
    if "experts" in stages:
        from loralab.training.train_experts import train_experts

        extra = ["expert.check=false", f"expert.retrain={str(_retrain(cfg, 'experts')).lower()}"]
        train_experts(
            compose_stage("train_experts", experiment, user_overrides, out / "experts", extra)
        )
    if "router" in stages and (_retrain(cfg, "router") or not Path(cfg.router_dir).is_dir()):
        from loralab.routing import train_router

        train_router(compose_stage("train_router", experiment, user_overrides, out / "router"))
    if "moelora" in stages and (_retrain(cfg, "moelora") or not Path(cfg.moelora_dir).is_dir()):
        from loralab.training.moelora_gate import train_moelora

        extra = [f"experts_dir={cfg.experts_dir}"]
        train_moelora(
            compose_stage("train_moelora", experiment, user_overrides, out / "moelora", extra)
        )
    if "xlora" in stages and (
        _retrain(cfg, "xlora") or not (Path(cfg.xlora_dir) / XLORA_MANIFEST_FILE).is_file()
    ):
        from loralab.training.xlora import train_xlora

        stage_cfg = compose_stage(
            "train_moelora",
            experiment,
            user_overrides,
            out / "xlora",
            [f"experts_dir={cfg.experts_dir}"],
        )
        adapters = {str(d): Path(cfg.experts_dir) / str(d) for d in cfg.data.domains}
        train_xlora(stage_cfg, adapters, out / "xlora")
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
