"""Random LoRA experts written like trained ones: fixtures for smoke runs, benchmarks and tests.

They carry no domain knowledge; the manifest says so (``random_expert: true``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from loralab.artifacts import write_adapter

LINEAR_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_random_experts(
    base: torch.nn.Module,
    names: Sequence[str],
    target_root: str | Path,
    fingerprint: str,
    base_name: str,
    r: int = 16,
    lora_alpha: int = 32,
    seed: int = 0,
) -> dict[str, Path]:
    """PEFT adapters with random A and B on every linear of ``base``, one folder per name under
    ``target_root``, each with a verified manifest; returns ``{name: folder}``."""
    folders: dict[str, Path] = {}
    for index, name in enumerate(names):
        torch.manual_seed(seed + index)
        config = LoraConfig(
            r=r, lora_alpha=lora_alpha, target_modules=LINEAR_TARGETS, init_lora_weights=False
        )
        peft_model = get_peft_model(copy.deepcopy(base), config)
        folders[name] = Path(target_root) / name
        write_adapter(
            peft_model,
            folders[name],
            {
                "domain": name,
                "base_model": {"name": base_name, "fingerprint": fingerprint},
                "random_expert": True,
            },
        )
    return folders
