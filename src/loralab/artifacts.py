"""Expert adapters on disk: PEFT's own format plus a ``manifest.json``, written atomically, verified
before use.

``<dir>/adapter_config.json`` + ``<dir>/adapter_model.safetensors`` load unchanged with
``PeftModel.from_pretrained`` and vLLM's ``--lora-modules``; ``manifest.json`` records the domain, the
base model's name and weight fingerprint, the adapter's SHA-256, the LoRA config, data hashes,
metrics, package versions and the git commit.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from peft import PeftModel

from loralab.data.records import file_sha256
from loralab.io_utils import atomic_directory
from loralab.provenance import git_commit, package_versions

ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "loralab-adapter/1"


class AdapterVerificationError(RuntimeError):
    """An adapter folder is incomplete, altered, or made for another base model."""


def write_adapter(model: PeftModel, target: str | Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Save the active adapter of ``model`` and its manifest into ``target`` in one atomic rename.

    ``manifest`` must hold ``domain`` and ``base_model`` (``name``, ``fingerprint``); this adds the
    file hash, LoRA config, versions, commit and time. Returns the full manifest.
    """
    for key in ("domain", "base_model"):
        if key not in manifest:
            raise ValueError(f"manifest needs {key!r}")
    with atomic_directory(target) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False)
        config_path = tmp / ADAPTER_CONFIG
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = manifest["base_model"]["name"]
        config_path.write_text(json.dumps(config, indent=2) + "\n")
        lora = {k: config[k] for k in ("r", "lora_alpha", "lora_dropout", "target_modules", "bias")}
        if isinstance(lora["target_modules"], list):
            lora["target_modules"] = sorted(lora["target_modules"])
        full = {
            "format": MANIFEST_FORMAT,
            **manifest,
            "adapter_file": ADAPTER_FILE,
            "adapter_sha256": file_sha256(tmp / ADAPTER_FILE),
            "lora": lora,
            "versions": package_versions(),
            "git_commit": git_commit(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        (tmp / MANIFEST).write_text(json.dumps(full, indent=2, default=str) + "\n")
    return full


def read_manifest(adapter_dir: str | Path) -> dict[str, Any]:
    path = Path(adapter_dir) / MANIFEST
    if not path.is_file():
        raise AdapterVerificationError(f"{path}: manifest missing (not a complete loralab adapter)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterVerificationError(
            f"{path}: not valid JSON ({e.msg}, line {e.lineno})"
        ) from None
    if not isinstance(manifest, dict):
        raise AdapterVerificationError(f"{path}: expected a JSON object")
    return manifest


def verify_adapter(
    adapter_dir: str | Path, expected_fingerprint: str | None = None
) -> dict[str, Any]:
    """Check an adapter folder before use and return its manifest.

    Raises ``AdapterVerificationError`` when a file is missing, the safetensors file's SHA-256
    differs from the manifest, or the base fingerprint differs from ``expected_fingerprint``.
    """
    adapter_dir = Path(adapter_dir)
    manifest = read_manifest(adapter_dir)
    for key in ("domain", "base_model", "adapter_sha256"):
        if key not in manifest:
            raise AdapterVerificationError(f"{adapter_dir / MANIFEST}: field '{key}' is missing")
    for name in (ADAPTER_FILE, ADAPTER_CONFIG):
        if not (adapter_dir / name).is_file():
            raise AdapterVerificationError(f"{adapter_dir / name}: missing")
    actual = file_sha256(adapter_dir / ADAPTER_FILE)
    if actual != manifest["adapter_sha256"]:
        raise AdapterVerificationError(
            f"{adapter_dir / ADAPTER_FILE}: sha256 {actual[:12]}… differs from the manifest's "
            f"{str(manifest['adapter_sha256'])[:12]}… (file altered or corrupt)"
        )
    fingerprint = manifest["base_model"].get("fingerprint")
    if expected_fingerprint is not None and fingerprint != expected_fingerprint:
        raise AdapterVerificationError(
            f"{adapter_dir}: trained on base model {manifest['base_model'].get('name')!r} with weight "
            f"fingerprint {str(fingerprint)[:12]}…, but the loaded base model's is {expected_fingerprint[:12]}…"
        )
    return manifest


def load_expert(
    base: Any, adapters: dict[str, str | Path], expected_fingerprint: str | None = None
) -> PeftModel:
    """Verify each adapter, then load them all onto ``base`` under their names (first one active)."""
    if not adapters:
        raise ValueError("no adapters given")
    model: PeftModel | None = None
    for name, path in adapters.items():
        verify_adapter(path, expected_fingerprint)
        if model is None:
            model = PeftModel.from_pretrained(
                base, str(path), adapter_name=name, is_trainable=False
            )
        else:
            model.load_adapter(str(path), adapter_name=name, is_trainable=False)
    assert model is not None
    return model
