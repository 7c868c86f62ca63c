"""Train a MoE-LoRA gate over the frozen experts: `python scripts/train_moelora.py [overrides]`.

Only the gate learns: next-token loss on responses of the union of the domain train splits plus
the auxiliary gate losses. The gate is saved to ``<run>/moelora/`` (moelora's own format), with
per-domain expert usage measured on the validation split.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from lightning import seed_everything
from omegaconf import DictConfig

from loralab.artifacts import verify_adapter
from loralab.base_model import load_base_model, weights_fingerprint
from loralab.config import to_container
from loralab.data.datamodule import DomainDataModule
from loralab.evaluation.figures import save_plot
from loralab.evaluation.routing_plots import plot_gate_usage_by_layer
from loralab.io_utils import atomic_write_json, exclusive_run_dir
from loralab.routing.prior import RouterPriors, gate_bias
from loralab.training.common import (
    TrainableStateModule,
    build_trainer,
    configure_adamw_cosine,
    start_checkpoint,
)
from loralab.training.random_experts import make_random_experts
from moelora import MoELoraConfig, MoELoraModel, RowRouting, expert_usage, load_gate, save_gate

log = logging.getLogger(__name__)

Batch = Mapping[str, torch.Tensor]


class GateTrainingModule(TrainableStateModule):
    """Trains only the gates of a MoELoraModel; everything else stays frozen (checked).

    Batches: ``input_ids`` / ``attention_mask`` / ``labels`` [B, T] and ``domain_id`` [B] indexing
    ``domains``; with ``prior=(scale, floor)``, also ``prior`` [B, S] (the router's gate-slot
    probabilities), added to every layer's gate logits as ``scale * log p`` (``gate_bias``), so the
    gate learns with the request-level prior in place. Validation accumulates the mean applied
    gate weight per domain, layer and slot.
    """

    def __init__(
        self,
        model: MoELoraModel,
        optim_cfg: Mapping[str, Any],
        domains: Sequence[str],
        prior: tuple[float, float] | None = None,
    ) -> None:
        super().__init__()
        self.prior = prior
        self.model = model.train()  # loaded in eval mode; gate noise needs training mode
        self.optim_cfg = dict(optim_cfg)
        self.domains = list(domains)
        self._usage_sums: torch.Tensor | None = None
        self._usage_counts: torch.Tensor | None = None
        self.last_usage: dict[str, Any] = {}
        self.check_only_gates_trainable()

    def check_only_gates_trainable(self) -> None:
        extra = self.model.non_gate_trainable()
        if extra:
            raise RuntimeError(
                f"only gate parameters may train, but these require grad: {extra[:5]}"
            )
        if not all(p.requires_grad for p in self.model.gate_parameters()):
            raise RuntimeError("gate parameters must require grad")

    def forward(self, batch: Batch) -> tuple[torch.Tensor, Any]:
        """(response-token LM loss, AuxLosses) for one batch; call inside model.recording()."""
        out = self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            use_cache=False,
            row_routing=self._prior_routing(batch),
        )
        return out.loss, self.model.aux_losses(batch["attention_mask"])

    def _prior_routing(self, batch: Batch) -> RowRouting | None:
        """Every row gated, with the batch's router prior on the gate logits (None: no prior)."""
        if self.prior is None:
            return None
        if "prior" not in batch:
            raise ValueError("the gate trains with a router prior but the batch has no 'prior'")
        bias = gate_bias(batch["prior"].float(), *self.prior)  # [B, S]
        b, device = bias.shape[0], bias.device
        weights = torch.zeros(b, self.model.num_experts, device=device)  # unused: all gated
        return RowRouting(weights, torch.ones(b, dtype=torch.bool, device=device), bias)

    def on_train_start(self) -> None:
        self.check_only_gates_trainable()

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        with self.model.recording():
            lm_loss, aux = self(batch)
        loss = lm_loss + aux.total
        n_tokens = int(batch["attention_mask"].sum())
        self.log("train/loss", loss, prog_bar=True, batch_size=n_tokens)
        self.log("train/lm_loss", lm_loss, batch_size=n_tokens)
        for name, value in aux.as_floats().items():
            self.log(f"train/aux_{name}", value, batch_size=n_tokens)
        self.log("train/tokens", float(n_tokens), reduce_fx="sum", on_step=False, on_epoch=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._usage_sums, self._usage_counts = None, None

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        with self.model.recording():
            lm_loss, aux = self(batch)
            trace = self.model.gate_trace()
        n_targets = max(1, int((batch["labels"][:, 1:] != -100).sum()))
        self.log("val/loss", lm_loss, prog_bar=True, batch_size=n_targets, sync_dist=True)
        for name, value in aux.as_floats().items():
            self.log(f"val/aux_{name}", value, batch_size=n_targets, sync_dist=True)
        domain = batch["domain_id"][:, None].expand_as(batch["attention_mask"])
        domain = torch.where(batch["attention_mask"].bool(), domain, -1)
        sums, counts = expert_usage(trace, domain, len(self.domains))
        if self._usage_sums is None or self._usage_counts is None:
            self._usage_sums, self._usage_counts = sums, counts
        else:
            self._usage_sums += sums
            self._usage_counts += counts

    def on_validation_epoch_end(self) -> None:
        if self._usage_sums is None or self._usage_counts is None:
            return
        sums, counts = self._usage_sums, self._usage_counts
        if self.trainer.world_size > 1:
            sums = cast(torch.Tensor, self.all_gather(sums)).sum(0)
            counts = cast(torch.Tensor, self.all_gather(counts)).sum(0)
        per_layer = sums / counts.clamp_min(1)[None, :, None]  # [L, D, S]
        mean = per_layer.mean(0)  # [D, S]
        slots = self.model.slot_names
        for d, domain in enumerate(self.domains):
            for s, slot in enumerate(slots):
                self.log(f"val/usage/{domain}/{slot}", float(mean[d, s]), sync_dist=False)
        self.last_usage = {
            "slots": slots,
            "domains": self.domains,
            "layers": [path for path, _ in self.model.moe_layers()],
            "mean": mean.tolist(),
            "per_layer": per_layer.permute(1, 0, 2).tolist(),  # [D, L, S]
            "tokens": counts.tolist(),
        }

    def configure_optimizers(self) -> Any:
        return configure_adamw_cosine(
            self.model.gate_parameters(), self.optim_cfg, self.total_steps()
        )


def resolve_expert_dirs(
    cfg: DictConfig, base: torch.nn.Module, fingerprint: str
) -> tuple[dict[str, Path], bool]:
    """({name: adapter folder}, random?) from ``experts_dir`` or, if null, random experts."""
    names = [str(n) for n in cfg.moelora.experts]
    if cfg.get("experts_dir"):
        root = Path(str(cfg.experts_dir))
        if not root.is_dir():
            raise FileNotFoundError(f"experts_dir={root}: no such folder")
        missing = [n for n in names if not (root / n).is_dir()]
        if missing:
            raise FileNotFoundError(f"experts_dir={root}: no expert folder for {missing}")
        for n in names:  # both adapter files' hashes and the base fingerprint
            verify_adapter(root / n, fingerprint)
        return {n: root / n for n in names}, False
    random_cfg = cfg.moelora.random_experts
    if not random_cfg.enabled:
        raise ValueError("experts_dir is null: set it to a train_experts <run>/adapters folder")
    target = Path(cfg.paths.output_dir) / "random_experts"
    log.warning("experts_dir is null: using random experts in %s (no domain knowledge)", target)
    folders = make_random_experts(
        base,
        names,
        target,
        fingerprint,
        str(cfg.base_model.name),
        int(random_cfg.r),
        int(random_cfg.lora_alpha),
        int(cfg.seed),
    )
    return folders, True


def train_moelora(cfg: DictConfig) -> dict[str, Any]:
    """Train the gate, save it to ``<output_dir>/moelora/`` and return paths, metrics and usage."""
    with exclusive_run_dir(cfg.paths.output_dir):
        return _train_moelora(cfg)


def _train_moelora(cfg: DictConfig) -> dict[str, Any]:
    seed_everything(int(cfg.seed), workers=True)
    out = Path(cfg.paths.output_dir)
    base, tokenizer = load_base_model(cfg.base_model, cfg.paths.cache_dir, device="cpu")
    fingerprint = weights_fingerprint(base)
    expert_dirs, random_experts = resolve_expert_dirs(cfg, base, fingerprint)
    moelora_cfg = to_container(cfg.moelora)
    moe_cfg = MoELoraConfig.from_dict({k: moelora_cfg[k] for k in ("gate", "aux", "compute_path")})
    model = MoELoraModel.from_adapters(base, expert_dirs, moe_cfg, fingerprint)
    warm_start = None
    if cfg.get("init_gate"):  # a gate over fewer experts: its rows kept, new experts' rows fresh
        load_gate(model, str(cfg.init_gate), allow_new_experts=True)
        warm_start = str(cfg.init_gate)
        log.info("gate warm-started from %s", warm_start)
    domains = [str(d) for d in cfg.data.domains]
    prior, row_prior, prior_info = _router_prior(cfg, tokenizer, domains, model.gate_slot_names)
    module = GateTrainingModule(model, cfg.moelora.optim, domains, prior)
    datamodule = DomainDataModule(
        cfg.data, tokenizer, domains, seed=int(cfg.seed), row_prior=row_prior
    )
    checkpoint_dir = out / "checkpoints" / "moelora"
    trainer = build_trainer(cfg, run_name="moelora", checkpoint_dir=checkpoint_dir)
    retrain = bool(cfg.get("retrain", False))
    start = start_checkpoint(cfg.get("ckpt_path"), checkpoint_dir, retrain, "moelora gate")
    trainer.fit(module, datamodule, ckpt_path=start)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    result: dict[str, Any] = {
        "gate_dir": str(out / "moelora"),
        "experts": {n: str(p) for n, p in expert_dirs.items()},
        "random_experts": random_experts,
        "warm_start": warm_start,
        "prior": prior_info,
        "base_fingerprint": fingerprint,
        "global_step": int(trainer.global_step),
        "trainable_parameters": sum(p.numel() for p in model.gate_parameters()),
        "metrics": metrics,
        "usage": module.last_usage,
    }
    if trainer.is_global_zero:
        model.cpu()
        save_gate(model, out / "moelora")
        atomic_write_json(out / "moelora" / "training.json", result)
        if module.last_usage:
            _log_usage(trainer, module.last_usage, out / "moelora" / "usage.png")
        log.info(
            "gate saved to %s (val/loss %.4f)",
            out / "moelora",
            metrics.get("val/loss", float("nan")),
        )
    return result


def _router_prior(
    cfg: DictConfig, tokenizer: Any, domains: Sequence[str], slots: Sequence[str]
) -> tuple[tuple[float, float] | None, Any, dict[str, Any] | None]:
    """With ``moelora.prior.enabled``: ((scale, floor), record -> slot probabilities, what to
    record); the train and val records are routed once (cached in ``<run>/router_priors.json``)."""
    prior_cfg = cfg.moelora.get("prior")
    if not prior_cfg or not prior_cfg.enabled:
        return None, None, None
    if not cfg.get("router_dir"):
        raise ValueError("moelora.prior.enabled=true needs router_dir (a saved router folder)")
    pool = str(prior_cfg.get("pool", "request"))
    cache = Path(cfg.paths.output_dir) / "router_priors.json"
    priors = RouterPriors(str(cfg.router_dir), cache, pool)
    plain = DomainDataModule(cfg.data, tokenizer, domains)
    priors.prepare(plain.records("train") + plain.records("val"))
    priors.release()
    scale, floor = float(prior_cfg.scale), float(prior_cfg.floor)
    info = {
        "scale": scale,
        "floor": floor,
        "pool": pool,
        "router_model_version": priors.model_version,
    }
    return (scale, floor), lambda record: priors.of(record, slots), info


def _log_usage(trainer: Any, usage: Mapping[str, Any], image_path: Path) -> None:
    """Save the usage heatmap and send the usage table and image to W&B when it is a logger."""
    from lightning.pytorch.loggers import WandbLogger

    save_plot(plot_gate_usage_by_layer(usage), image_path)
    rows = [[d, *row] for d, row in zip(usage["domains"], usage["mean"], strict=True)]
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_table("moelora/usage", columns=["domain", *usage["slots"]], data=rows)
            logger.log_image("moelora/usage_heatmap", images=[str(image_path)])
