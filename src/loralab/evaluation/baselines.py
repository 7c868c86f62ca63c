"""PEFT's own mixtures over the same frozen experts, for side-by-side comparison: X-LoRA and Arrow."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from peft import ArrowConfig, PeftModel, XLoraConfig, create_arrow_model, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

XLORA_CLASSIFIER_FILE = "xlora_classifier.safetensors"


def build_xlora(
    base: PreTrainedModel,
    adapters: Mapping[str, str | Path],
    depth: int = 1,
    layerwise: bool = True,
) -> PeftModel:
    """PEFT X-LoRA over ``adapters`` (in order); only its scaling classifier is trainable.

    X-LoRA needs the KV cache off, and the installed peft fails with named adapters, so they are
    registered as "0", "1", ... in the order of ``adapters``.
    """
    base.config.use_cache = False
    config = XLoraConfig(
        task_type="CAUSAL_LM",
        hidden_size=base.config.hidden_size,
        adapters={str(i): str(p) for i, p in enumerate(adapters.values())},
        xlora_depth=depth,
        layerwise_scalings=layerwise,
    )
    return get_peft_model(base, config)


def xlora_classifier_state(model: PeftModel) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad
    }


def save_xlora_classifier(model: PeftModel, path: str | Path) -> None:
    save_file(xlora_classifier_state(model), str(path))


def load_xlora_classifier(model: PeftModel, path: str | Path) -> None:
    """Load classifier weights saved by :func:`save_xlora_classifier` (safetensors only)."""
    state = load_file(str(path))
    expected = set(xlora_classifier_state(model))
    if set(state) != expected:
        raise ValueError(
            f"{path}: X-LoRA classifier keys differ from the model's ({sorted(expected)[:3]}...)"
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def build_arrow(
    base: PreTrainedModel,
    adapters: Mapping[str, str | Path],
    top_k: int = 3,
    temperature: float = 1.0,
) -> PeftModel:
    """PEFT Arrow: training-free per-token routing by the experts' SVD prototypes."""
    config = ArrowConfig(
        top_k=min(top_k, len(adapters)), router_temperature=temperature, rng_seed=0
    )
    return create_arrow_model(base, [str(p) for p in adapters.values()], config)
