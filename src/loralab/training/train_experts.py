"""Train one LoRA expert per domain, write verified adapters, and check them on held-out data."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from lightning import seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig

from loralab.artifacts import MANIFEST, load_expert, verify_adapter, write_adapter
from loralab.base_model import load_base_model, weights_fingerprint
from loralab.config import to_container
from loralab.data.datamodule import DomainDataModule
from loralab.data.records import data_file_hashes
from loralab.evaluation.expert_check import experts_beat_base, format_table, nll_matrix, save_table
from loralab.io_utils import exclusive_run_dir
from loralab.training.common import build_trainer, start_checkpoint
from loralab.training.expert_module import LoRAExpertModule

log = logging.getLogger(__name__)


def train_one_expert(
    cfg: DictConfig,
    domain: str,
    tokenizer: Any,
    fingerprint: str,
    target: Path,
    retrain: bool = False,
) -> dict[str, Any]:
    """Fit a LoRA on ``domain``'s train split (val for validation) and write it to ``target``.

    An interrupted run resumes from ``<run>/checkpoints/<domain>/last.ckpt``; ``retrain`` deletes
    those checkpoints first and trains from scratch.
    """
    seed_everything(int(cfg.seed), workers=True)
    base, _ = load_base_model(cfg.base_model, cfg.paths.cache_dir, device="cpu")
    module = LoRAExpertModule(base, cfg.expert.lora, cfg.expert.optim)
    datamodule = DomainDataModule(cfg.data, tokenizer, [domain], seed=int(cfg.seed))
    checkpoint_dir = Path(cfg.paths.output_dir) / "checkpoints" / domain
    trainer = build_trainer(cfg, run_name=domain, checkpoint_dir=checkpoint_dir)
    start = start_checkpoint(cfg.get("ckpt_path"), checkpoint_dir, retrain, f"expert {domain}")
    trainer.fit(module, datamodule, ckpt_path=start)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    ckpt_cb = trainer.checkpoint_callback
    best = ckpt_cb.best_model_score if isinstance(ckpt_cb, ModelCheckpoint) else None
    manifest: dict[str, Any] = {}
    if trainer.is_global_zero:
        manifest = write_adapter(
            module.model,
            target,
            {
                "domain": domain,
                "base_model": {
                    "name": str(cfg.base_model.name),
                    "fingerprint": fingerprint,
                    "config": to_container(cfg.base_model),
                },
                "data": {
                    "files": data_file_hashes(cfg.data, [domain]),
                    "n_train": len(datamodule.encode("train")),
                    "n_val": len(datamodule.encode("val")),
                    "max_length": int(cfg.data.max_length),
                    "val_fraction": float(cfg.data.val_fraction),
                    "test_fraction": float(cfg.data.test_fraction),
                },
                "training": {
                    "global_step": int(trainer.global_step),
                    "seed": int(cfg.seed),
                    "optim": to_container(cfg.expert.optim),
                },
                "metrics": {**metrics, "best_val_loss": float(best) if best is not None else None},
            },
        )
        log.info(
            "expert %s written to %s (val/loss %.4f)",
            domain,
            target,
            metrics.get("val/loss", float("nan")),
        )
    _finish_wandb(trainer)
    return manifest


def _finish_wandb(trainer: Any) -> None:
    """Close the W&B run so the next domain gets its own run in the same process."""
    from lightning.pytorch.loggers import WandbLogger

    if any(isinstance(lg, WandbLogger) for lg in trainer.loggers):
        import wandb

        wandb.finish()


def train_experts(cfg: DictConfig) -> dict[str, Any]:
    """Train (or reuse) one expert per ``cfg.expert.domains``, then run the expert check.

    Adapters land in ``<output_dir>/adapters/<domain>/``; a complete, verified adapter already there
    is kept and an interrupted expert resumes from its ``last.ckpt``, unless ``expert.retrain=true``:
    then every expert is trained again from scratch (its checkpoints deleted).
    """
    with exclusive_run_dir(cfg.paths.output_dir):
        return _train_experts(cfg)


def _train_experts(cfg: DictConfig) -> dict[str, Any]:
    out = Path(cfg.paths.output_dir)
    base, tokenizer = load_base_model(cfg.base_model, cfg.paths.cache_dir)
    fingerprint = weights_fingerprint(base)
    del base
    domains = [str(d) for d in cfg.expert.domains]
    adapters: dict[str, Path] = {}
    trained, reused, seconds = [], [], {}
    for domain in domains:
        started = time.perf_counter()
        target = out / "adapters" / domain
        if (target / MANIFEST).is_file() and not cfg.expert.retrain:
            verify_adapter(target, fingerprint)
            log.info("expert %s: reusing %s (verified)", domain, target)
            reused.append(domain)
        else:
            retrain = bool(cfg.expert.retrain)
            train_one_expert(cfg, domain, tokenizer, fingerprint, target, retrain)
            trained.append(domain)
        adapters[domain] = target
        seconds[domain] = round(time.perf_counter() - started, 2)
    result: dict[str, Any] = {
        "adapters": {d: str(p) for d, p in adapters.items()},
        "base_fingerprint": fingerprint,
        "trained": trained,
        "reused": reused,
        "seconds": seconds,
    }
    if cfg.expert.check:
        result["expert_check"] = run_expert_check(cfg, adapters, fingerprint)
    return result


def run_expert_check(
    cfg: DictConfig, adapters: dict[str, Path], fingerprint: str
) -> dict[str, Any]:
    """Held-out (test split) mean token NLL, expert x domain plus the base row; logged and saved."""
    base, tokenizer = load_base_model(cfg.base_model, cfg.paths.cache_dir)
    model = load_expert(base, {d: p for d, p in adapters.items()}, fingerprint).eval()
    loaders = {d: DomainDataModule(cfg.data, tokenizer, [d]) for d in adapters}
    table = nll_matrix(model, loaders, list(adapters))
    beats = experts_beat_base(table)
    n_test = {d: len(dm.encode("test")) for d, dm in loaders.items()}
    save_table(table, cfg.paths.output_dir, {"expert_beats_base": beats, "n_test": n_test})
    log.info(
        "held-out mean token NLL (test split; rows: model, columns: domain)\n%s",
        format_table(table),
    )
    log.info("expert beats base on its own domain: %s", beats)
    return {"mean_token_nll": table, "expert_beats_base": beats, "n_test": n_test}
