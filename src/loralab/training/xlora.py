"""Train, save and load PEFT X-LoRA's scaling classifier over the frozen experts: the baseline for
MoE-LoRA, with the same data, steps and optimizer settings as the MoE-LoRA gate
(``cfg.moelora.optim``, ``cfg.trainer``). The classifier is saved as safetensors with a manifest
binding it to its experts' hashes and the base fingerprint; loading verifies all of them."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning import seed_everything
from omegaconf import DictConfig
from peft import PeftModel
from safetensors.torch import load_file, save_file

from loralab.artifacts import MANIFEST, AdapterVerificationError, read_manifest, verify_adapter
from loralab.base_model import load_base_model, weights_fingerprint
from loralab.baselines import build_xlora
from loralab.data.datamodule import DomainDataModule
from loralab.io_utils import atomic_directory, atomic_write_json, file_sha256
from loralab.training.common import (
    TrainableStateModule,
    build_trainer,
    configure_adamw_cosine,
    start_checkpoint,
)

log = logging.getLogger(__name__)

XLORA_CLASSIFIER_FILE = "xlora_classifier.safetensors"
XLORA_MANIFEST_FILE = MANIFEST  # read with read_manifest, like an adapter's
XLORA_FORMAT = "loralab-xlora-classifier/1"


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
    seed_everything(int(cfg.seed), workers=True)
    out_dir = Path(out_dir)
    base, tokenizer = load_base_model(cfg.base_model, cfg.paths.cache_dir, device="cpu")
    fingerprint = weights_fingerprint(base)
    for path in adapters.values():
        verify_adapter(path, fingerprint)
    module = XLoraTrainingModule(build_xlora(base, adapters), cfg.moelora.optim)
    datamodule = DomainDataModule(cfg.data, tokenizer, list(adapters), seed=int(cfg.seed))
    checkpoint_dir = out_dir / "checkpoints"
    trainer = build_trainer(cfg, run_name="xlora", checkpoint_dir=checkpoint_dir)
    retrain = bool(cfg.get("retrain", False))
    start = start_checkpoint(cfg.get("ckpt_path"), checkpoint_dir, retrain, "X-LoRA classifier")
    trainer.fit(module, datamodule, ckpt_path=start)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    with atomic_directory(out_dir / "xlora") as tmp:
        save_xlora_classifier(module.model, tmp, adapters, fingerprint, metrics)
    log.info("X-LoRA classifier written to %s", out_dir / "xlora")
    return out_dir / "xlora"


def xlora_classifier_state(model: PeftModel) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad
    }


def _expert_hashes(adapters: Mapping[str, str | Path]) -> list[dict[str, str]]:
    """Name and adapter SHA-256 of each expert, in order (from their verified manifests)."""
    return [
        {"name": name, "adapter_sha256": str(read_manifest(path)["adapter_sha256"])}
        for name, path in adapters.items()
    ]


def save_xlora_classifier(
    model: PeftModel,
    out_dir: str | Path,
    adapters: Mapping[str, str | Path],
    base_fingerprint: str,
    metrics: Mapping[str, float] | None = None,
) -> None:
    """Write the classifier (safetensors) and a manifest binding it to its experts and base model."""
    out = Path(out_dir)
    save_file(xlora_classifier_state(model), str(out / XLORA_CLASSIFIER_FILE))
    manifest: dict[str, Any] = {
        "format": XLORA_FORMAT,
        "classifier_sha256": file_sha256(out / XLORA_CLASSIFIER_FILE),
        "base_fingerprint": base_fingerprint,
        "experts": _expert_hashes(adapters),
        "metrics": dict(metrics or {}),
    }
    atomic_write_json(out / XLORA_MANIFEST_FILE, manifest)


def load_xlora_classifier(
    model: PeftModel,
    xlora_dir: str | Path,
    adapters: Mapping[str, str | Path],
    base_fingerprint: str,
) -> dict[str, Any]:
    """Load a classifier saved by :func:`save_xlora_classifier` into ``model``; return its manifest.

    Refuses (``AdapterVerificationError``) a classifier whose file hash, experts (names, order,
    adapter hashes) or base model differ from its manifest's; safetensors only.
    """
    xlora_dir = Path(xlora_dir)
    manifest_path = xlora_dir / XLORA_MANIFEST_FILE
    classifier = xlora_dir / XLORA_CLASSIFIER_FILE
    if not manifest_path.is_file() or not classifier.is_file():
        raise AdapterVerificationError(
            f"{xlora_dir}: needs {XLORA_CLASSIFIER_FILE} and {XLORA_MANIFEST_FILE} "
            "(not a complete X-LoRA classifier; retrain it)"
        )
    manifest = read_manifest(xlora_dir)  # same file name as an adapter's; names the JSON error
    if manifest.get("format") != XLORA_FORMAT:
        raise AdapterVerificationError(
            f"{manifest_path}: field 'format' is {manifest.get('format')!r}, expected {XLORA_FORMAT!r}"
        )
    if file_sha256(classifier) != manifest.get("classifier_sha256"):
        raise AdapterVerificationError(f"{classifier}: sha256 differs from {manifest_path}")
    if manifest.get("base_fingerprint") != base_fingerprint:
        raise AdapterVerificationError(
            f"{manifest_path}: trained on another base model (field 'base_fingerprint')"
        )
    if manifest.get("experts") != _expert_hashes(adapters):
        raise AdapterVerificationError(
            f"{manifest_path}: field 'experts' differs from the experts given "
            f"({[e['name'] for e in manifest.get('experts') or []]} vs {list(adapters)}, "
            "or an adapter file changed)"
        )
    state = load_file(str(classifier))
    expected = set(xlora_classifier_state(model))
    if set(state) != expected:
        raise ValueError(
            f"{classifier}: X-LoRA classifier keys differ from the model's ({sorted(expected)[:3]}...)"
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
    return dict(manifest)
