"""The gate weights sent with each generated token (``return_gate_weights``): the recorded weights
of every wrapped linear, averaged per decoder block, rounded for the wire."""

from __future__ import annotations

from typing import Any

import torch

from moelora import MoELoraModel


def gate_payload(weights: torch.Tensor) -> dict[str, Any]:
    """weights [blocks, S] -> {"layers": [[w per slot] per block], "mean": [w per slot]}."""
    return {
        "layers": [[round(float(w), 4) for w in block] for block in weights],
        "mean": [round(float(w), 4) for w in weights.mean(dim=0)],
    }


def block_average(model: MoELoraModel) -> torch.Tensor:
    """[blocks, moe layers] averaging matrix: each decoder block's wrapped linears, in model order
    (paths ``...layers.<i>....``; a model without numbered blocks is one block)."""
    paths = [path for path, _ in model.moe_layers()]
    keys: list[str] = []
    for path in paths:
        parts = path.split(".")
        number = next((p for p in parts if p.isdigit()), "")
        if number not in keys:
            keys.append(number)
    mix = torch.zeros(len(keys), len(paths))
    for column, path in enumerate(paths):
        number = next((p for p in path.split(".") if p.isdigit()), "")
        mix[keys.index(number), column] = 1.0
    return mix / mix.sum(dim=1, keepdim=True)
