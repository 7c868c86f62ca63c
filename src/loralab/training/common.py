"""Pieces every Lightning job shares: AdamW with warmup + cosine, a trainer from config, and a
module base that checkpoints only trainable weights (a 135M base need not go into every .ckpt)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig

from loralab.tracking import build_lightning_loggers


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup from 0 to 1 over ``warmup_steps``, then cosine to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / max(1, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def configure_adamw_cosine(
    params: Iterable[torch.nn.Parameter], optim_cfg: Mapping[str, Any], total_steps: int
) -> dict[str, Any]:
    """AdamW over ``params`` with a per-step warmup + cosine schedule, as Lightning expects it."""
    optimizer = torch.optim.AdamW(
        [p for p in params if p.requires_grad],
        lr=float(optim_cfg["lr"]),
        weight_decay=float(optim_cfg.get("weight_decay", 0.0)),
        betas=tuple(optim_cfg.get("betas", (0.9, 0.999))),
    )
    warmup = int(optim_cfg.get("warmup_steps", 0))
    min_ratio = float(optim_cfg.get("min_lr_ratio", 0.1))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, warmup, max(1, total_steps), min_ratio)
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class TrainableStateModule(L.LightningModule):
    """A LightningModule whose checkpoints hold only parameters with ``requires_grad``.

    Frozen weights are rebuilt from the base model on resume, so ``strict_loading`` is off.
    """

    def __init__(self) -> None:
        super().__init__()
        self.strict_loading = False

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if k in trainable
        }

    def total_steps(self) -> int:
        return int(self.trainer.estimated_stepping_batches)


def build_trainer(
    cfg: DictConfig,
    run_name: str,
    checkpoint_dir: str | Path,
    extra_callbacks: Sequence[Callback] = (),
) -> L.Trainer:
    """A Trainer from ``cfg.trainer`` with loggers from ``cfg.logger`` and last-checkpointing.

    ``checkpoint_dir`` holds ``last.ckpt`` (resume with ``ckpt_path=last``) and the best by
    ``val/loss``.
    """
    from hydra.utils import instantiate

    callbacks: list[Callback] = [
        ModelCheckpoint(
            dirpath=str(checkpoint_dir),
            filename="best",
            monitor="val/loss",
            mode="min",
            save_last=True,
            save_top_k=1,
            every_n_train_steps=cfg.get("checkpoint_every_n_steps"),
        ),
        *extra_callbacks,
    ]
    loggers = build_lightning_loggers(cfg, run_name)
    if loggers:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    return instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)


def resolve_ckpt_path(ckpt_path: str | None, checkpoint_dir: str | Path) -> str | None:
    """``last`` -> ``<checkpoint_dir>/last.ckpt`` if it exists (else start fresh); paths pass through."""
    if ckpt_path in (None, "", "null"):
        return None
    if ckpt_path == "last":
        last = Path(checkpoint_dir) / "last.ckpt"
        return str(last) if last.is_file() else None
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such checkpoint")
    return ckpt_path
