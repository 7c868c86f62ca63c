"""Save / load only the gate: ``gate.safetensors`` plus ``moelora.json`` naming the experts.

moelora.json records the config, the gate's experts (name, domain, folder, sha256 of their
adapter_model.safetensors), the wrapped module paths and the sha256 of gate.safetensors. Loading
refuses a gate whose experts, config, modules or weights file differ from what was saved, except
that ``allow_new_experts=True`` warm-starts a gate over more experts: the saved experts' slots are
copied, the new experts' slots keep a fresh gate's initialisation.
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

import torch
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
        "experts": [e.to_dict() for e in model.gate_experts],
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


def load_gate(model: MoELoraModel, directory: str | Path, allow_new_experts: bool = False) -> None:
    """Load a saved gate into a model built from the same experts, config and base modules.

    allow_new_experts: the model's gate may mix more experts than the saved gate (issue: a new
    domain); every saved expert must still be there with the same adapter sha256. The saved
    slots are copied by name, the new experts' slots keep their fresh initialisation.
    """
    folder = Path(directory)
    saved = read_gate_metadata(folder)
    where = folder / GATE_CONFIG
    current = gate_metadata(model)
    saved_experts = [(e["name"], e["adapter_sha256"]) for e in saved["experts"]]
    model_experts = [(e["name"], e["adapter_sha256"]) for e in current["experts"]]
    grows = allow_new_experts and saved_experts != model_experts
    if grows and not set(saved_experts) <= set(model_experts):
        lost = sorted(set(saved_experts) - set(model_experts))
        raise GateFileError(
            f"{where}: gate was trained over experts {lost} (name, adapter sha256) that the "
            f"model lacks; it has {model_experts}"
        )
    if not grows and saved_experts != model_experts:
        raise GateFileError(
            f"{where}: gate was trained over experts {saved_experts} (name, adapter sha256) but "
            f"the model has {model_experts}; an adapter file changed or the experts differ "
            "(allow_new_experts=True warm-starts a gate over more experts)"
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
    state = load_safetensors(raw)
    if grows:
        state = _grow(state, model, [name for name, _ in saved_experts], where)
    model.load_gate_state_dict(state)


def _grow(
    saved: dict[str, torch.Tensor], model: MoELoraModel, saved_names: list[str], where: Path
) -> dict[str, torch.Tensor]:
    """The model's fresh gate state with the saved experts' slot rows (and "none") copied in."""
    null = ["none"] if model.config.gate.null_expert else []
    target = {name: i for i, name in enumerate(model.gate_slot_names)}
    rows = torch.tensor([target[name] for name in saved_names + null])  # saved slot -> model slot
    state = {key: value.clone() for key, value in model.gate_state_dict().items()}
    for key, gate in model.gates().items():
        slot_keys = {f"{key}.{name}" for name in gate.slot_parameter_names()}
        for name in gate.state_dict():
            full = f"{key}.{name}"
            if full not in saved:
                raise GateFileError(f"{where}: gate weight '{full}' missing from {GATE_WEIGHTS}")
            if full in slot_keys:
                state[full][rows] = saved[full].to(state[full].dtype)
            elif saved[full].shape == state[full].shape:
                state[full] = saved[full]
            else:
                raise GateFileError(
                    f"{where}: gate weight '{full}' has shape {tuple(saved[full].shape)}, "
                    f"expected {tuple(state[full].shape)}"
                )
    return state


def load_moelora(
    base_model: nn.Module,
    directory: str | Path,
    experts: Mapping[str, str | Path] | None = None,
    expected_base_fingerprint: str | None = None,
    compute_path: ComputePath | None = None,
    allow_new_experts: bool = False,
) -> MoELoraModel:
    """Rebuild a MoE-LoRA model from a saved gate folder.

    The experts are read from the folders recorded at save time unless ``experts`` overrides them
    (same names, same order); their files must still hash to the recorded sha256. compute_path
    overrides the saved one (the gate does not depend on it). allow_new_experts: ``experts`` may
    add experts the gate was not trained over; the gate grows a fresh slot for each (warm start
    for retraining it, see load_gate).
    """
    saved = read_gate_metadata(directory)
    folders = experts or {e["name"]: e["directory"] for e in saved["experts"]}
    config = MoELoraConfig.from_dict(saved["config"])
    if compute_path is not None:
        config = replace(config, compute_path=compute_path)
    model = MoELoraModel.from_adapters(base_model, folders, config, expected_base_fingerprint)
    load_gate(model, directory, allow_new_experts)
    return model
