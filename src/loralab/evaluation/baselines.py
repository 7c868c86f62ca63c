"""PEFT's own mixtures over the same frozen experts, for side-by-side comparison: X-LoRA and Arrow."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from peft import ArrowConfig, PeftModel, XLoraConfig, create_arrow_model, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from loralab.artifacts import MANIFEST, AdapterVerificationError, read_manifest
from loralab.data.records import file_sha256
from loralab.io_utils import atomic_write_json

XLORA_CLASSIFIER_FILE = "xlora_classifier.safetensors"
XLORA_MANIFEST_FILE = MANIFEST  # read with read_manifest, like an adapter's
XLORA_FORMAT = "loralab-xlora-classifier/1"


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


def _expert_hashes(adapters: Mapping[str, str | Path]) -> list[dict[str, str]]:
    """Name and adapter SHA-256 of each expert, in order (from their verified manifests)."""
    return [
        {"name": name, "adapter_sha256": str(read_manifest(path)["adapter_sha256"])}
        for name, path in adapters.items()
    ]


def save_xlora_classifier(
    model: PeftModel,
    out_dir: str | Path,
    adapters: Mapping[str, str | Path],
    base_fingerprint: str,
    metrics: Mapping[str, float] | None = None,
) -> None:
    """Write the classifier (safetensors) and a manifest binding it to its experts and base model."""
    out = Path(out_dir)
    save_file(xlora_classifier_state(model), str(out / XLORA_CLASSIFIER_FILE))
    manifest: dict[str, Any] = {
        "format": XLORA_FORMAT,
        "classifier_sha256": file_sha256(out / XLORA_CLASSIFIER_FILE),
        "base_fingerprint": base_fingerprint,
        "experts": _expert_hashes(adapters),
        "metrics": dict(metrics or {}),
    }
    atomic_write_json(out / XLORA_MANIFEST_FILE, manifest)


def load_xlora_classifier(
    model: PeftModel,
    xlora_dir: str | Path,
    adapters: Mapping[str, str | Path],
    base_fingerprint: str,
) -> dict[str, Any]:
    """Load a classifier saved by :func:`save_xlora_classifier` into ``model``; return its manifest.

    Refuses (``AdapterVerificationError``) a classifier whose file hash, experts (names, order,
    adapter hashes) or base model differ from its manifest's; safetensors only.
    """
    xlora_dir = Path(xlora_dir)
    manifest_path = xlora_dir / XLORA_MANIFEST_FILE
    classifier = xlora_dir / XLORA_CLASSIFIER_FILE
    if not manifest_path.is_file() or not classifier.is_file():
        raise AdapterVerificationError(
            f"{xlora_dir}: needs {XLORA_CLASSIFIER_FILE} and {XLORA_MANIFEST_FILE} "
            "(not a complete X-LoRA classifier; retrain it)"
        )
    manifest = read_manifest(xlora_dir)  # same file name as an adapter's; names the JSON error
    if manifest.get("format") != XLORA_FORMAT:
        raise AdapterVerificationError(
            f"{manifest_path}: field 'format' is {manifest.get('format')!r}, expected {XLORA_FORMAT!r}"
        )
    if file_sha256(classifier) != manifest.get("classifier_sha256"):
        raise AdapterVerificationError(f"{classifier}: sha256 differs from {manifest_path}")
    if manifest.get("base_fingerprint") != base_fingerprint:
        raise AdapterVerificationError(
            f"{manifest_path}: trained on another base model (field 'base_fingerprint')"
        )
    if manifest.get("experts") != _expert_hashes(adapters):
        raise AdapterVerificationError(
            f"{manifest_path}: field 'experts' differs from the experts given "
            f"({[e['name'] for e in manifest.get('experts') or []]} vs {list(adapters)}, "
            "or an adapter file changed)"
        )
    state = load_file(str(classifier))
    expected = set(xlora_classifier_state(model))
    if set(state) != expected:
        raise ValueError(
            f"{classifier}: X-LoRA classifier keys differ from the model's ({sorted(expected)[:3]}...)"
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
    return dict(manifest)


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
