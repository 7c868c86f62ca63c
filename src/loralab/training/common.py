"""Pieces every Lightning job shares: AdamW with warmup + cosine (transformers' schedule), a trainer from config, and a
module base that checkpoints only trainable weights (a 135M base need not go into every .ckpt)."""

from __future__ import annotations

import io
import logging
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from loralab.io_utils import atomic_write_bytes
from loralab.tracking import build_lightning_loggers

log = logging.getLogger(__name__)


def configure_adamw_cosine(
    params: Iterable[torch.nn.Parameter], optim_cfg: Mapping[str, Any], total_steps: int
) -> dict[str, Any]:
    """AdamW over ``params`` with transformers' per-step schedule, as Lightning expects it: the LR
    rises linearly from 0 over ``warmup_steps`` (step 0 has LR 0), then follows a cosine down to
    ``min_lr_ratio * lr`` at ``total_steps``."""
    optimizer = torch.optim.AdamW(
        [p for p in params if p.requires_grad],
        lr=float(optim_cfg["lr"]),
        weight_decay=float(optim_cfg.get("weight_decay", 0.0)),
        betas=tuple(optim_cfg.get("betas", (0.9, 0.999))),
    )
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer,
        num_warmup_steps=int(optim_cfg.get("warmup_steps", 0)),
        num_training_steps=max(1, total_steps),
        min_lr_rate=float(optim_cfg.get("min_lr_ratio", 0.1)),
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class TrainableStateModule(L.LightningModule):
    """A LightningModule whose checkpoints hold only parameters with ``requires_grad``, plus the
    torch RNG state, so that a resumed run draws the same dropout masks as an uninterrupted one.

    Frozen weights are rebuilt from the base model on resume, so ``strict_loading`` is off. The RNG
    state is put back at the first training batch after the restore (Lightning draws from the RNG
    while it sets up the data loaders).
    """

    def __init__(self) -> None:
        super().__init__()
        self.strict_loading = False
        self._resume_rng: torch.Tensor | None = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if k in trainable
        }
        checkpoint["torch_rng_state"] = torch.get_rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._resume_rng = checkpoint.get("torch_rng_state")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._resume_rng is not None:
            torch.set_rng_state(self._resume_rng)
            self._resume_rng = None

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
        ModelCheckpoint(  # first: trainer.checkpoint_callback (best_model_score)
            dirpath=str(checkpoint_dir), filename="best", monitor="val/loss", mode="min"
        ),
        # `last.ckpt` apart from the best: Lightning defers a monitored checkpoint until the metric
        # exists, so the steps before the first validation would never be saved
        ModelCheckpoint(
            dirpath=str(checkpoint_dir),
            save_last=True,
            save_top_k=0,
            every_n_train_steps=cfg.get("checkpoint_every_n_steps"),
        ),
        *extra_callbacks,
    ]
    loggers = build_lightning_loggers(cfg, run_name)
    if loggers:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    return instantiate(
        cfg.trainer, logger=loggers or False, callbacks=callbacks, plugins=[AtomicCheckpointIO()]
    )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temp file and renamed: a run killed while saving keeps the previous
    complete ``last.ckpt`` (Lightning's own writer truncates the file in place)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write_bytes(path, buffer.getvalue())


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


def start_checkpoint(
    ckpt_path: str | None, checkpoint_dir: str | Path, retrain: bool, what: str
) -> str | None:
    """The checkpoint ``trainer.fit`` starts from, said in the log.

    ``retrain``: delete ``checkpoint_dir`` (its ``last.ckpt`` would resume a finished run) and train
    from scratch. Otherwise :func:`resolve_ckpt_path`: an interrupted run resumes from ``last``.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if retrain:
        if checkpoint_dir.exists():
            log.info("%s: retrain: deleting the checkpoints in %s", what, checkpoint_dir)
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
        log.info("%s: training from scratch (retrain)", what)
        return None
    resolved = resolve_ckpt_path(ckpt_path, checkpoint_dir)
    if resolved:
        log.info("%s: resuming from %s", what, resolved)
    else:
        log.info("%s: training from scratch (no checkpoint in %s)", what, checkpoint_dir)
    return resolved
