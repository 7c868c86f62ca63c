"""PEFT's own mixtures over the same frozen experts, for side-by-side comparison: X-LoRA and Arrow.

The builders live here because training (``loralab.training.xlora``) and evaluation both use them;
the X-LoRA classifier's training, saving and verified loading are in ``loralab.training.xlora``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from peft import ArrowConfig, PeftModel, XLoraConfig, create_arrow_model, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import PreTrainedModel


def build_xlora(
    base: PreTrainedModel,
    adapters: Mapping[str, str | Path],
    depth: int = 1,
    layerwise: bool = True,
) -> PeftModel:
    """PEFT X-LoRA over ``adapters`` (in order); only its scaling classifier is trainable.

    X-LoRA needs the KV cache off, and the installed peft fails with named adapters, so they are
    registered as "0", "1", ... in the order of ``adapters``. The frozen experts run without their
    LoRA dropout, in training too, as under the MoE-LoRA gate: the two mixtures then learn from the
    same expert outputs (PEFT would keep each expert's dropout active while the classifier trains,
    which also slows its training step on CPU).
    """
    base.config.use_cache = False
    config = XLoraConfig(
        task_type="CAUSAL_LM",
        hidden_size=base.config.hidden_size,
        adapters={str(i): str(p) for i, p in enumerate(adapters.values())},
        xlora_depth=depth,
        layerwise_scalings=layerwise,
    )
    model = get_peft_model(base, config)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name in module.lora_dropout:
                module.lora_dropout[name] = nn.Identity()
    return model


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
