"""Training throughput of one LoRA expert: tokens/s and peak memory for a config."""

from __future__ import annotations

import resource
import time
from contextlib import nullcontext
from typing import Any

import torch
from lightning import seed_everything
from omegaconf import DictConfig

from loralab.base_model import load_base_model, resolve_device
from loralab.data.datamodule import DomainDataModule
from loralab.training.common import configure_adamw_cosine
from loralab.training.expert_module import LoRAExpertModule


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_train(cfg: DictConfig) -> dict[str, Any]:
    """Time ``cfg.bench.steps`` optimizer steps (after ``cfg.bench.warmup``) on ``cfg.bench.domain``.

    Uses the expert's model, optimizer, batch size, sequence length and precision from ``cfg``.
    ``tokens_per_s`` counts real (non-padding) tokens; ``padded_tokens_per_s`` all positions.
    """
    seed_everything(int(cfg.seed), workers=True)
    device = resolve_device(cfg.base_model.get("device", "auto"))
    base, tok = load_base_model(cfg.base_model, cfg.paths.cache_dir)
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
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    real = padded = 0
    start = 0.0
    for i, batch in enumerate(batches):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
        with autocast:
            loss = module(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            real += int(batch["attention_mask"].sum())
            padded += batch["input_ids"].numel()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    return {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu x{torch.get_num_threads()}",
        "base_model": str(cfg.base_model.name),
        "precision": str(cfg.trainer.precision),
        "batch_size": int(cfg.data.batch_size),
        "max_length": int(cfg.data.max_length),
        "lora_r": int(cfg.expert.lora.r),
        "steps": steps,
        "step_s": elapsed / steps,
        "tokens_per_s": real / elapsed,
        "padded_tokens_per_s": padded / elapsed,
        "peak_memory_mb": peak_memory_mb(device),
        "final_loss": float(loss.detach()),
    }
