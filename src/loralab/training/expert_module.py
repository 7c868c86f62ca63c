"""LightningModule that trains one PEFT LoRA expert on a frozen base model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from loralab.training.common import TrainableStateModule, configure_adamw_cosine


def lora_config_from(lora_cfg: Mapping[str, Any]) -> LoraConfig:
    return LoraConfig(
        r=int(lora_cfg["r"]),
        lora_alpha=int(lora_cfg["lora_alpha"]),
        lora_dropout=float(lora_cfg["lora_dropout"]),
        target_modules=list(lora_cfg["target_modules"]),
        bias=lora_cfg.get("bias", "none"),
        task_type="CAUSAL_LM",
    )


class LoRAExpertModule(TrainableStateModule):
    """Wraps ``base`` with a fresh LoRA adapter (named ``default``) and trains only that adapter.

    Batches are dicts with ``input_ids`` / ``attention_mask`` / ``labels`` [B, T]; the loss is the
    mean next-token NLL over response tokens (labels != -100).
    """

    def __init__(
        self, base: PreTrainedModel, lora_cfg: Mapping[str, Any], optim_cfg: Mapping[str, Any]
    ):
        super().__init__()
        self.model: PeftModel = get_peft_model(base, lora_config_from(lora_cfg))
        self.model.train()  # the base is loaded in eval mode; LoRA dropout must be active in training
        self.optim_cfg = dict(optim_cfg)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        out = self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
        )
        return out.loss

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self(batch)
        n_tokens = int(batch["attention_mask"].sum())
        self.log("train/loss", loss, prog_bar=True, batch_size=n_tokens)
        self.log("train/tokens", float(n_tokens), reduce_fx="sum", on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        loss = self(batch)
        # batch_size = response tokens, so the epoch value is the token-weighted mean NLL
        n_targets = int((batch["labels"][:, 1:] != -100).sum())
        self.log("val/loss", loss, prog_bar=True, batch_size=max(1, n_targets), sync_dist=True)

    def configure_optimizers(self) -> Any:
        return configure_adamw_cosine(self.model.parameters(), self.optim_cfg, self.total_steps())
