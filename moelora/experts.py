"""Read frozen LoRA experts from PEFT adapter folders and check that they fit together.

An expert folder holds PEFT's ``adapter_config.json`` and ``adapter_model.safetensors`` plus the
lab's ``manifest.json`` (domain, base-model fingerprint, sha256 of the safetensors file, LoRA
hyper-parameters). Everything is read as JSON or safetensors; nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MANIFEST = "manifest.json"

_KEY_PREFIX = "base_model.model."
_A_SUFFIX = ".lora_A.weight"
_B_SUFFIX = ".lora_B.weight"

# adapter_config.json fields that change what a LoRA layer computes beyond B @ A * scaling.
_MUST_BE_FALSY = (
    "use_dora",
    "lora_bias",
    "fan_in_fan_out",
    "use_qalora",
    "use_bdlora",
    "alpha_pattern",
    "modules_to_save",
    "trainable_token_indices",
    "target_parameters",
    "layer_replication",
    "arrow_config",
    "velora_config",
    "monteclora_config",
    "kasa_config",
    "alora_invocation_tokens",
)


class ExpertError(ValueError):
    """An expert folder is missing, malformed, changed, or does not fit with the others."""


@dataclass(frozen=True)
class ExpertInfo:
    """What identifies an expert (kept after the weights are stacked into the layers)."""

    name: str
    directory: str
    domain: str
    base_name: str
    base_fingerprint: str
    adapter_sha256: str
    lora_alpha: float
    use_rslora: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "directory": self.directory,
            "domain": self.domain,
            "base_name": self.base_name,
            "base_fingerprint": self.base_fingerprint,
            "adapter_sha256": self.adapter_sha256,
        }


@dataclass(frozen=True)
class ExpertAdapter:
    """One expert: its identity plus per-module weights A [r, in] and B [out, r]."""

    info: ExpertInfo
    weights: Mapping[str, tuple[torch.Tensor, torch.Tensor]]

    def scaling(self, module_path: str) -> float:
        """PEFT's scaling for one module: alpha / r (alpha / sqrt(r) with rsLoRA)."""
        rank = self.weights[module_path][0].shape[0]
        denominator = math.sqrt(rank) if self.info.use_rslora else rank
        return self.info.lora_alpha / denominator


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_json_object(path: Path, error: type[ValueError] = ExpertError) -> dict[str, Any]:
    """The JSON object in ``path``; ``error`` naming the file (and line) when it is missing or bad."""
    if not path.is_file():
        raise error(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise error(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from err
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _field(data: Mapping[str, Any], dotted: str, kind: type | tuple[type, ...], path: Path) -> Any:
    value: Any = data
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise ExpertError(f"{path}: missing field '{dotted}'")
        value = value[part]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        expected = " or ".join(k.__name__ for k in kinds)
        raise ExpertError(f"{path}: field '{dotted}' must be {expected}, got {value!r}")
    return value


def _check_adapter_config(config: Mapping[str, Any], path: Path) -> None:
    if config.get("peft_type") != "LORA":
        raise ExpertError(
            f"{path}: field 'peft_type' must be 'LORA', got {config.get('peft_type')!r}"
        )
    if config.get("bias", "none") != "none":
        raise ExpertError(f"{path}: field 'bias' must be 'none', got {config['bias']!r}")
    for name in _MUST_BE_FALSY:
        if config.get(name):
            raise ExpertError(f"{path}: field '{name}'={config[name]!r} is not supported")


def _split_weights(
    tensors: Mapping[str, torch.Tensor], path: Path
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    a_weights: dict[str, torch.Tensor] = {}
    b_weights: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if key.startswith(_KEY_PREFIX) and key.endswith(_A_SUFFIX):
            a_weights[key[len(_KEY_PREFIX) : -len(_A_SUFFIX)]] = tensor
        elif key.startswith(_KEY_PREFIX) and key.endswith(_B_SUFFIX):
            b_weights[key[len(_KEY_PREFIX) : -len(_B_SUFFIX)]] = tensor
        else:
            raise ExpertError(f"{path}: unsupported tensor '{key}' (only Linear lora_A/lora_B)")
    if set(a_weights) != set(b_weights):
        lonely = sorted(set(a_weights) ^ set(b_weights))
        raise ExpertError(f"{path}: modules with only one of lora_A / lora_B: {lonely}")
    if not a_weights:
        raise ExpertError(f"{path}: no LoRA weights found")
    weights = {}
    for module_path, a in a_weights.items():
        b = b_weights[module_path]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ExpertError(
                f"{path}: '{module_path}' has lora_A {tuple(a.shape)} and lora_B "
                f"{tuple(b.shape)}; expected [r, in] and [out, r]"
            )
        weights[module_path] = (a.float(), b.float())
    return weights


def read_expert(name: str, directory: str | Path) -> ExpertAdapter:
    """Read and verify one expert folder (manifest fields, sha256, supported LoRA options)."""
    folder = Path(directory)
    if not folder.is_dir():
        raise ExpertError(f"expert '{name}': folder {folder} not found")
    manifest_path = folder / MANIFEST
    config_path = folder / ADAPTER_CONFIG
    weights_path = folder / ADAPTER_WEIGHTS
    manifest = read_json_object(manifest_path)
    config = read_json_object(config_path)
    if not weights_path.is_file():
        raise ExpertError(f"{weights_path}: file not found")

    domain = _field(manifest, "domain", str, manifest_path)
    base_name = _field(manifest, "base_model.name", str, manifest_path)
    fingerprint = _field(manifest, "base_model.fingerprint", str, manifest_path)
    expected_sha = _field(manifest, "adapter_sha256", str, manifest_path)
    manifest_rank = _field(manifest, "lora.r", int, manifest_path)
    manifest_alpha = _field(manifest, "lora.lora_alpha", (int, float), manifest_path)

    raw = weights_path.read_bytes()  # hash exactly the bytes that are loaded
    actual_sha = hashlib.sha256(raw).hexdigest()
    if actual_sha != expected_sha:
        raise ExpertError(
            f"{weights_path}: sha256 {actual_sha} differs from adapter_sha256 {expected_sha} in "
            f"{manifest_path}; the adapter file changed after its manifest was written"
        )
    _check_adapter_config(config, config_path)
    rank = _field(config, "r", int, config_path)
    alpha = _field(config, "lora_alpha", (int, float), config_path)
    if (rank, float(alpha)) != (manifest_rank, float(manifest_alpha)):
        raise ExpertError(
            f"{manifest_path}: lora.r={manifest_rank}, lora.lora_alpha={manifest_alpha} disagree "
            f"with {config_path} (r={rank}, lora_alpha={alpha})"
        )
    info = ExpertInfo(
        name=name,
        directory=str(folder.resolve()),
        domain=domain,
        base_name=base_name,
        base_fingerprint=fingerprint,
        adapter_sha256=actual_sha,
        lora_alpha=float(alpha),
        use_rslora=bool(config.get("use_rslora", False)),
    )
    return ExpertAdapter(info=info, weights=_split_weights(load_safetensors(raw), weights_path))


def check_compatible(
    experts: list[ExpertAdapter], expected_base_fingerprint: str | None = None
) -> list[str]:
    """Check that experts share the base model and target modules; return the module paths.

    Ranks may differ between experts and modules; the in/out widths of each module must agree.
    """
    if not experts:
        raise ExpertError("at least one expert is needed")
    names = [e.info.name for e in experts]
    if len(set(names)) != len(names):
        raise ExpertError(f"expert names must be unique, got {names}")
    first = experts[0]
    reference = expected_base_fingerprint or first.info.base_fingerprint
    for expert in experts:
        if expert.info.base_fingerprint != reference:
            source = (
                "the expected base model"
                if expected_base_fingerprint
                else f"expert '{first.info.name}'"
            )
            raise ExpertError(
                f"expert '{expert.info.name}' was trained on base fingerprint "
                f"{expert.info.base_fingerprint} ({expert.info.base_name}), but {source} has "
                f"{reference}; all experts must share the base model"
            )
    targets = sorted(first.weights)
    for expert in experts[1:]:
        if sorted(expert.weights) != targets:
            missing = sorted(set(targets) - set(expert.weights))
            extra = sorted(set(expert.weights) - set(targets))
            raise ExpertError(
                f"expert '{expert.info.name}' targets different modules than "
                f"'{first.info.name}': missing {missing[:5]}, extra {extra[:5]}"
            )
        for module_path in targets:
            a0, b0 = first.weights[module_path]
            a, b = expert.weights[module_path]
            if a.shape[1] != a0.shape[1] or b.shape[0] != b0.shape[0]:
                raise ExpertError(
                    f"'{module_path}': expert '{expert.info.name}' maps {a.shape[1]}->{b.shape[0]} "
                    f"but '{first.info.name}' maps {a0.shape[1]}->{b0.shape[0]}"
                )
    return targets
