"""Expert adapters on disk: PEFT's own format plus a ``manifest.json``, written atomically, verified
before use.

``<dir>/adapter_config.json`` + ``<dir>/adapter_model.safetensors`` load unchanged with
``PeftModel.from_pretrained`` and vLLM's ``--lora-modules``; ``manifest.json`` records the domain, the
base model's name and weight fingerprint, the SHA-256 of both adapter files, the LoRA config, data
hashes, metrics, package versions and the git commit. ``verify_adapter`` checks both hashes and the
base fingerprint; skipping the fingerprint check takes the explicit ``SKIP_BASE_CHECK`` and is logged.
"""

from __future__ import annotations

import enum
import json
import logging
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from peft import PeftModel

from loralab.io_utils import atomic_directory, file_sha256
from loralab.provenance import git_commit, package_versions

ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "loralab-adapter/1"

log = logging.getLogger(__name__)


class _SkipBaseCheck(enum.Enum):
    SKIP = "skip"


# Pass as ``expected_fingerprint`` only where no base model is loaded (e.g. listing artifacts):
# the files' hashes are still checked, the skip is logged.
SKIP_BASE_CHECK = _SkipBaseCheck.SKIP


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
            "adapter_config_sha256": file_sha256(config_path),
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


def _check_hash(adapter_dir: Path, name: str, field: str, manifest: dict[str, Any]) -> None:
    actual = file_sha256(adapter_dir / name)
    if actual != manifest[field]:
        raise AdapterVerificationError(
            f"{adapter_dir / name}: sha256 {actual[:12]}… differs from the manifest's '{field}' "
            f"{str(manifest[field])[:12]}… (file altered or corrupt)"
        )


def verify_adapter(
    adapter_dir: str | Path, expected_fingerprint: str | _SkipBaseCheck
) -> dict[str, Any]:
    """Check an adapter folder before use and return its manifest.

    ``expected_fingerprint`` is the loaded base model's ``weights_fingerprint`` (required; pass
    ``SKIP_BASE_CHECK`` only where no base model is loaded). Raises ``AdapterVerificationError``
    when a file is missing, the SHA-256 of ``adapter_model.safetensors`` or ``adapter_config.json``
    differs from the manifest (altered weights, or a changed rank / alpha / target list), the
    manifest predates config hashing, or the base fingerprint differs.
    """
    adapter_dir = Path(adapter_dir)
    manifest = read_manifest(adapter_dir)
    for key in ("domain", "base_model", "adapter_sha256"):
        if key not in manifest:
            raise AdapterVerificationError(f"{adapter_dir / MANIFEST}: field '{key}' is missing")
    if "adapter_config_sha256" not in manifest:
        raise AdapterVerificationError(
            f"{adapter_dir / MANIFEST}: field 'adapter_config_sha256' is missing (written before "
            f"{ADAPTER_CONFIG} was hashed): retrain the adapter (expert.retrain=true, or "
            "pipeline.retrain=[experts]), or, if you trust its config, re-manifest it by adding "
            f"the sha256 of {ADAPTER_CONFIG} as 'adapter_config_sha256'"
        )
    for name in (ADAPTER_FILE, ADAPTER_CONFIG):
        if not (adapter_dir / name).is_file():
            raise AdapterVerificationError(f"{adapter_dir / name}: missing")
    _check_hash(adapter_dir, ADAPTER_FILE, "adapter_sha256", manifest)
    _check_hash(adapter_dir, ADAPTER_CONFIG, "adapter_config_sha256", manifest)
    fingerprint = manifest["base_model"].get("fingerprint")
    if expected_fingerprint is SKIP_BASE_CHECK:
        log.warning("%s: base-model fingerprint check skipped (SKIP_BASE_CHECK)", adapter_dir)
    elif fingerprint != expected_fingerprint:
        raise AdapterVerificationError(
            f"{adapter_dir}: trained on base model {manifest['base_model'].get('name')!r} with weight "
            f"fingerprint {str(fingerprint)[:12]}…, but the loaded base model's is "
            f"{str(expected_fingerprint)[:12]}…"
        )
    return manifest


def load_expert(
    base: Any, adapters: Mapping[str, str | Path], expected_fingerprint: str
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
