"""Save / load only the gate: ``gate.safetensors`` plus ``moelora.json`` naming the experts.

moelora.json records the config, the experts (name, domain, folder, sha256 of their
adapter_model.safetensors), the wrapped module paths and the sha256 of gate.safetensors. Loading
refuses a gate whose experts, config, modules or weights file differ from what was saved.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch import nn

from moelora.config import ComputePath, MoELoraConfig
from moelora.experts import file_sha256, read_json_object
from moelora.model import MoELoraModel

GATE_WEIGHTS = "gate.safetensors"
GATE_CONFIG = "moelora.json"
FORMAT = "moelora-gate/1"


class GateFileError(ValueError):
    """A saved gate is missing, malformed, or does not belong to the model it is loaded into."""


def gate_metadata(model: MoELoraModel) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "config": model.config.to_dict(),
        "experts": [e.to_dict() for e in model.experts],
        "modules": [path for path, _ in model.moe_layers()],
    }


def save_gate(model: MoELoraModel, directory: str | Path) -> Path:
    """Write the gate atomically (temp folder + rename); replaces an existing gate folder."""
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tensors = {k: v.contiguous().cpu() for k, v in model.gate_state_dict().items()}
        save_file(tensors, str(staging / GATE_WEIGHTS), metadata={"format": FORMAT})
        metadata = gate_metadata(model)
        metadata["gate_sha256"] = file_sha256(staging / GATE_WEIGHTS)
        (staging / GATE_CONFIG).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(staging, target)
            shutil.rmtree(old)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def read_gate_metadata(directory: str | Path) -> dict[str, Any]:
    """Read and sanity-check moelora.json."""
    path = Path(directory) / GATE_CONFIG
    data = read_json_object(path, GateFileError)
    if data.get("format") != FORMAT:
        raise GateFileError(f"{path}: field 'format' must be {FORMAT!r}")
    for key, kind in (("config", dict), ("experts", list), ("modules", list), ("gate_sha256", str)):
        if not isinstance(data.get(key), kind):
            raise GateFileError(f"{path}: field '{key}' missing or not a {kind.__name__}")
    for index, expert in enumerate(data["experts"]):
        for key in ("name", "directory", "adapter_sha256"):
            if not isinstance(expert, dict) or not isinstance(expert.get(key), str):
                raise GateFileError(f"{path}: field 'experts[{index}].{key}' missing or not a str")
    return data


def load_gate(model: MoELoraModel, directory: str | Path) -> None:
    """Load a saved gate into a model built from the same experts, config and base modules."""
    folder = Path(directory)
    saved = read_gate_metadata(folder)
    where = folder / GATE_CONFIG
    current = gate_metadata(model)
    saved_experts = [(e["name"], e["adapter_sha256"]) for e in saved["experts"]]
    model_experts = [(e["name"], e["adapter_sha256"]) for e in current["experts"]]
    if saved_experts != model_experts:
        raise GateFileError(
            f"{where}: gate was trained over experts {saved_experts} (name, adapter sha256) but "
            f"the model has {model_experts}; an adapter file changed or the experts differ"
        )
    if MoELoraConfig.from_dict(saved["config"]).gate.structure() != model.config.gate.structure():
        raise GateFileError(
            f"{where}: field 'config.gate' {saved['config']['gate']} does not fit the model's "
            f"gate config {current['config']['gate']} (kind, scope, hidden_size, null_expert, "
            "normalize_input must match)"
        )
    if saved["modules"] != current["modules"]:
        raise GateFileError(f"{where}: field 'modules' differs from the model's wrapped modules")
    weights = folder / GATE_WEIGHTS
    if not weights.is_file():
        raise GateFileError(f"{weights}: file not found")
    raw = weights.read_bytes()
    if hashlib.sha256(raw).hexdigest() != saved["gate_sha256"]:
        raise GateFileError(f"{weights}: sha256 differs from 'gate_sha256' in {where}")
    model.load_gate_state_dict(load_safetensors(raw))


def load_moelora(
    base_model: nn.Module,
    directory: str | Path,
    experts: Mapping[str, str | Path] | None = None,
    expected_base_fingerprint: str | None = None,
    compute_path: ComputePath | None = None,
) -> MoELoraModel:
    """Rebuild a MoE-LoRA model from a saved gate folder.

    The experts are read from the folders recorded at save time unless ``experts`` overrides them
    (same names, same order); their files must still hash to the recorded sha256. compute_path
    overrides the saved one (the gate does not depend on it).
    """
    saved = read_gate_metadata(directory)
    folders = experts or {e["name"]: e["directory"] for e in saved["experts"]}
    config = MoELoraConfig.from_dict(saved["config"])
    if compute_path is not None:
        config = replace(config, compute_path=compute_path)
    model = MoELoraModel.from_adapters(base_model, folders, config, expected_base_fingerprint)
    load_gate(model, directory)
    return model
