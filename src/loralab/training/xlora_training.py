"""Train PEFT X-LoRA's scaling classifier over the frozen experts: the baseline for MoE-LoRA, with the
same data, steps and optimizer settings as the MoE-LoRA gate (``cfg.moelora.optim``, ``cfg.trainer``)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from loralab.artifacts import verify_adapter
from loralab.base_model import load_base_model, weights_fingerprint
from loralab.config import seed_everything
from loralab.data.datamodule import DomainDataModule
from loralab.evaluation.baselines import build_xlora, save_xlora_classifier
from loralab.io_utils import atomic_directory
from loralab.training.common import (
    TrainableStateModule,
    build_trainer,
    configure_adamw_cosine,
    resolve_ckpt_path,
)

log = logging.getLogger(__name__)


class XLoraTrainingModule(TrainableStateModule):
    """Next-token loss on response tokens; only X-LoRA's classifier has ``requires_grad``."""

    def __init__(self, model: Any, optim_cfg: Mapping[str, Any]) -> None:
        super().__init__()
        self.model = model.train()
        self.optim_cfg = dict(optim_cfg)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
        ).loss

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=int(batch["attention_mask"].sum()))
        return loss

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        n_targets = max(1, int((batch["labels"][:, 1:] != -100).sum()))
        self.log("val/loss", self(batch), prog_bar=True, batch_size=n_targets, sync_dist=True)

    def configure_optimizers(self) -> Any:
        return configure_adamw_cosine(self.model.parameters(), self.optim_cfg, self.total_steps())


def train_xlora(cfg: DictConfig, adapters: Mapping[str, Path], out_dir: str | Path) -> Path:
    """Train X-LoRA on the union of the domain train splits; write ``<out_dir>/xlora/`` (the
    classifier + a manifest naming its experts and base model). Resumes with ``ckpt_path=last``."""
    seed_everything(int(cfg.seed))
    out_dir = Path(out_dir)
    base, tokenizer = load_base_model(cfg.base_model, cfg.paths.cache_dir, device="cpu")
    fingerprint = weights_fingerprint(base)
    for path in adapters.values():
        verify_adapter(path, fingerprint)
    module = XLoraTrainingModule(build_xlora(base, adapters), cfg.moelora.optim)
    datamodule = DomainDataModule(cfg.data, tokenizer, list(adapters), seed=int(cfg.seed))
    checkpoint_dir = out_dir / "checkpoints"
    trainer = build_trainer(cfg, run_name="xlora", checkpoint_dir=checkpoint_dir)
    trainer.fit(
        module, datamodule, ckpt_path=resolve_ckpt_path(cfg.get("ckpt_path"), checkpoint_dir)
    )
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    with atomic_directory(out_dir / "xlora") as tmp:
        save_xlora_classifier(module.model, tmp, adapters, fingerprint, metrics)
    log.info("X-LoRA classifier written to %s", out_dir / "xlora")
    return out_dir / "xlora"
