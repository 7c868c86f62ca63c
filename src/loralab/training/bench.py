"""Training throughput of one LoRA expert: tokens/s and peak memory for a config, measured as
``loralab.measurement`` defines it (median wall-clock step, absolute peak allocated memory)."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from lightning import seed_everything
from omegaconf import DictConfig

from loralab.base_model import load_base_model, resolve_device
from loralab.data.datamodule import DomainDataModule
from loralab.measurement import (
    PeakMemory,
    definition,
    materialize_weights,
    set_threads,
    time_calls,
    weights_bytes,
)
from loralab.training.common import configure_adamw_cosine
from loralab.training.expert_module import LoRAExpertModule


def bench_train(cfg: DictConfig) -> dict[str, Any]:
    """Time ``cfg.bench.steps`` optimizer steps (after ``cfg.bench.warmup``) on ``cfg.bench.domain``.

    Uses the expert's model, optimizer, batch size, sequence length and precision from ``cfg``.
    ``step_s`` is the median wall-clock step (forward, backward, clipping, AdamW step);
    ``tokens_per_s`` = mean real (non-padding) tokens per timed step / ``step_s``;
    ``padded_tokens_per_s`` counts every position. ``peak_memory_mb``: peak allocated memory over
    the warm-up and timed steps, weights, gradients and optimizer state included.
    """
    seed_everything(int(cfg.seed), workers=True)
    threads = set_threads(cfg.bench.get("threads"))
    device = resolve_device(cfg.base_model.get("device", "auto"))
    base, tok = load_base_model(cfg.base_model, cfg.paths.cache_dir)
    materialize_weights(base)
    module = LoRAExpertModule(base, cfg.expert.lora, cfg.expert.optim).to(device)
    steps, warmup = int(cfg.bench.steps), int(cfg.bench.warmup)
    optimizer = configure_adamw_cosine(module.model.parameters(), cfg.expert.optim, steps + warmup)[
        "optimizer"
    ]
    loader = DomainDataModule(
        cfg.data, tok, [str(cfg.bench.domain)], seed=int(cfg.seed)
    ).train_dataloader()
    batches = []
    for batch in loader:
        batches.append({k: v.to(device) for k, v in batch.items()})
        if len(batches) == steps + warmup:
            break
    batches = [batches[i % len(batches)] for i in range(steps + warmup)]  # repeat a small split
    bf16 = "bf16" in str(cfg.trainer.precision)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    queue = iter(batches)
    losses: list[torch.Tensor] = []

    def step() -> None:
        with autocast:
            loss = module(next(queue))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    with PeakMemory(device) as memory:
        timing = time_calls(step, device, repeats=steps, warmup=warmup)
    timed = batches[warmup:]
    real = sum(int(b["attention_mask"].sum()) for b in timed) / steps
    padded = sum(b["input_ids"].numel() for b in timed) / steps
    return {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({threads} threads)",
        "base_model": str(cfg.base_model.name),
        "precision": str(cfg.trainer.precision),
        "batch_size": int(cfg.data.batch_size),
        "max_length": int(cfg.data.max_length),
        "lora_r": int(cfg.expert.lora.r),
        "steps": steps,
        "step_s": timing.median_s,
        "tokens_per_s": real / timing.median_s,
        "padded_tokens_per_s": padded / timing.median_s,
        "peak_memory_mb": memory.mib,
        "weights_mb": round(weights_bytes(module) / 2**20, 1),
        "final_loss": float(losses[-1]),
        "measurement": definition(device, steps, warmup, threads),
    }
