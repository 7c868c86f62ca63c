"""Save / load a router as ``router.json`` + ``router.safetensors`` (no pickle anywhere).

The JSON holds the format version, labels, encoder spec and fingerprint, temperature, thresholds,
input policy, descriptions and the SHA-256 of the tensor file; the tensors hold the head, the
description embeddings, the OOD prototypes, the head gate's prototypes and the style shift (if
any; with a neighbour term, the embeddings and labels of the requests that vote) and the embeddings
of a few probe texts. A router whose encoder was tuned for it carries the
encoder in ``encoder/`` (a sentence-transformers folder, safetensors), so the folder moves as one.
Loading re-encodes the probe texts and refuses an encoder whose fingerprint (weights SHA-256
included) or embeddings differ.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from router.calibration import Thresholds
from router.classifier import (
    DescriptionPrior,
    HeadGate,
    NeighbourVotes,
    StyleShift,
    head_from_tensors,
)
from router.encoders import Encoder, EncoderSpec, build_encoder, similarity_dim
from router.inputs import InputPolicy
from router.packaged_models import resolve_model_name

if TYPE_CHECKING:
    from router.core import Router

FORMAT = "loralab-router"
FORMAT_VERSION = 1
CONFIG_FILE = "router.json"
TENSORS_FILE = "router.safetensors"
ENCODER_DIR = "encoder"  # a bundled encoder's folder inside the router folder
PROBE_TEXTS = (
    "What are the symptoms of type 2 diabetes?",
    "Write a Python function that reverses a linked list.",
    "Is the tenant liable for rent after assigning the lease?",
    "Suggest three names for a bakery.",
)
# Probe embeddings from the same weights agree to ~1e-6; int8 kernels on another CPU to ~1e-3.
# A different model or quantisation gives cosines far below this.
MIN_PROBE_COSINE = 0.995


class RouterFileError(ValueError):
    """A router folder is missing, incomplete, corrupt or of an unknown format."""


class EncoderMismatchError(ValueError):
    """The encoder differs from the one the router was trained with."""


@contextlib.contextmanager
def _atomic_directory(target: Path) -> Iterator[Path]:
    """A temp folder beside ``target`` that replaces it in one rename on success."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _encoder_spec(encoder: Encoder) -> dict[str, Any]:
    spec = getattr(encoder, "spec", None)
    return (
        spec.to_dict()
        if isinstance(spec, EncoderSpec)
        else {"kind": "custom", "name": encoder.name}
    )


def save_router(
    router: Router,
    path: str | Path,
    extra: Mapping[str, Any] | None = None,
    bundle_encoder: bool = False,
) -> str:
    """Write ``router`` to folder ``path``; sets and returns ``router.model_version``. With
    ``bundle_encoder`` its encoder's model folder (a local sentence-transformers model) is copied
    into ``path/encoder`` and loaded from there."""
    from safetensors.numpy import save_file

    encoder: dict[str, Any] = {
        "spec": _encoder_spec(router.encoder),
        "fingerprint": router.encoder.fingerprint(),
    }
    source = None
    if bundle_encoder:
        source = Path(resolve_model_name(str(encoder["spec"]["name"])))
        if encoder["spec"]["kind"] != "sentence_transformers" or not source.is_dir():
            raise ValueError(
                f"only a local sentence-transformers model folder can be bundled, got "
                f"{encoder['spec']['kind']!r} {encoder['spec']['name']!r}"
            )
        # named by its place in the router folder: the model version does not depend on where
        # the encoder was tuned
        encoder = {
            "spec": {**encoder["spec"], "name": ENCODER_DIR},
            "fingerprint": {**encoder["fingerprint"], "name": ENCODER_DIR},
            "bundled": True,
        }

    tensors: dict[str, np.ndarray] = dict(router.head.tensors())
    if router.prior is not None:
        tensors["prior.embeddings"] = router.prior.embeddings
        tensors["prior.label_index"] = router.prior.label_index.astype(np.int64)
    if router.prototypes is not None:
        tensors["ood.prototypes"] = router.prototypes
    if router.head_gate is not None:
        tensors["head_gate.prototypes"] = router.head_gate.prototypes
    if router.style_shift is not None:
        tensors["style_shift.prior_mix"] = router.style_shift.prior_mix
        tensors["style_shift.bias"] = router.style_shift.bias
        if router.style_shift.embedding_weight is not None:
            tensors["style_shift.embedding_weight"] = router.style_shift.embedding_weight
        nb = router.style_shift.neighbours
        if router.style_shift.vote_weight is not None and nb is not None:
            tensors["style_shift.vote_weight"] = router.style_shift.vote_weight
            tensors["style_shift.neighbours.embeddings"] = nb.embeddings
            tensors["style_shift.neighbours.label_index"] = nb.label_index.astype(np.int64)
    tensors["probe.embeddings"] = router.encoder.encode(list(PROBE_TEXTS))
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    config: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "labels": list(router.labels),
        "base_label": router.base_label,
        "encoder": encoder,
        "head": router.head.config(),
        "temperature": router.temperature,
        "prior": None
        if router.prior is None
        else {"weight": router.prior_weight, "scale": router.prior.scale},
        "thresholds": router.thresholds.to_dict(),
        "policy": vars(router.policy).copy(),
        "descriptions": {k: list(v) for k, v in router.descriptions.items()},
        "probe_texts": list(PROBE_TEXTS),
        "batch_size": router.batch_size,
        "extra": dict(extra or {}),
    }
    if router.head_gate is not None:  # absent otherwise: an ungated router keeps its version
        config["head_gate"] = {"low": router.head_gate.low, "high": router.head_gate.high}
    if router.style_shift is not None:  # likewise
        config["style_shift"] = {"head_scale": router.style_shift.head_scale}
        if router.style_shift.neighbours is not None:  # likewise
            nb = router.style_shift.neighbours
            config["style_shift"]["neighbours"] = {"k": nb.k, "temperature": nb.temperature}
    if router.similarity_dim is not None:  # likewise: only with a concatenated encoder
        config["similarity_dim"] = router.similarity_dim
    with _atomic_directory(Path(path)) as tmp:
        if source is not None:
            shutil.copytree(source, tmp / ENCODER_DIR)
        save_file(tensors, str(tmp / TENSORS_FILE))
        config["tensors_sha256"] = _sha256(tmp / TENSORS_FILE)
        body = json.dumps({k: v for k, v in config.items() if k != "extra"}, sort_keys=True)
        config["model_version"] = hashlib.sha256(body.encode()).hexdigest()[:12]
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    router.model_version = config["model_version"]
    return router.model_version


def read_router_config(path: str | Path) -> dict[str, Any]:
    """The validated ``router.json`` of a router folder."""
    folder = Path(path)
    if not folder.is_dir():
        raise RouterFileError(f"router folder not found: {folder}")
    for name in (CONFIG_FILE, TENSORS_FILE):
        if not (folder / name).is_file():
            raise RouterFileError(
                f"{folder}: missing {name} (not a saved router, or an incomplete copy)"
            )
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RouterFileError(f"{folder / CONFIG_FILE}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise RouterFileError(f"{folder / CONFIG_FILE}: not a {FORMAT} file")
    if config.get("format_version") != FORMAT_VERSION:
        raise RouterFileError(
            f"{folder / CONFIG_FILE}: format_version {config.get('format_version')!r}, this code reads "
            f"{FORMAT_VERSION}"
        )
    required = ("labels", "base_label", "encoder", "head", "temperature", "thresholds", "policy")
    missing = [k for k in (*required, "tensors_sha256", "model_version") if k not in config]
    if missing:
        raise RouterFileError(f"{folder / CONFIG_FILE}: missing field(s) {missing}")
    return config


def check_encoder(encoder: Encoder, config: Mapping[str, Any], probe: np.ndarray) -> None:
    """Raise ``EncoderMismatchError`` unless ``encoder`` matches the saved fingerprint and probes."""
    saved = config["encoder"]["fingerprint"]
    now = encoder.fingerprint()
    diffs = [
        f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}"
        for k in ("dim", "quantize", "max_seq_length", "weights_sha256", "encode", "static")
        if saved.get(k) != now.get(k)
        and not (k == "weights_sha256" and None in (saved.get(k), now.get(k)))
    ]
    if not diffs:
        emb = encoder.encode(list(config.get("probe_texts", PROBE_TEXTS)))
        cos = (emb * probe).sum(axis=1) if emb.shape == probe.shape else np.zeros(1)
        if float(cos.min()) < MIN_PROBE_COSINE:
            diffs.append(
                f"probe embeddings differ (min cosine {float(cos.min()):.4f} < {MIN_PROBE_COSINE})"
            )
    if diffs:
        raise EncoderMismatchError(
            f"router was trained with encoder {saved.get('name')!r}, got {now.get('name')!r}: "
            + "; ".join(diffs)
        )


def load_router(path: str | Path, encoder: Encoder | None = None) -> Router:
    """Load a router folder written by ``save_router``."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from router.core import Router

    folder = Path(path)
    config = read_router_config(folder)
    tensor_path = folder / TENSORS_FILE
    if _sha256(tensor_path) != config["tensors_sha256"]:
        raise RouterFileError(
            f"{tensor_path}: SHA-256 differs from router.json (corrupt or modified)"
        )
    try:
        # Fresh aligned copies: safetensors returns views at arbitrary offsets, and BLAS picks
        # different (last-bit different) kernels for unaligned buffers.
        tensors = {k: np.array(v, copy=True) for k, v in load_file(str(tensor_path)).items()}
    except (SafetensorError, OSError, ValueError) as e:
        raise RouterFileError(f"{tensor_path}: cannot read tensors ({e})") from None
    try:
        labels = tuple(config["labels"])
        head = head_from_tensors(config["head"], tensors)
        probe = tensors["probe.embeddings"]
        prior = None
        if config.get("prior"):
            prior = DescriptionPrior(
                tensors["prior.embeddings"],
                tensors["prior.label_index"],
                len(labels),
                float(config["prior"]["scale"]),
            )
        prototypes = tensors.get("ood.prototypes")
        head_gate = None
        if config.get("head_gate"):
            head_gate = HeadGate(
                tensors["head_gate.prototypes"],
                float(config["head_gate"]["low"]),
                float(config["head_gate"]["high"]),
            )
        style_shift = None
        if config.get("style_shift"):
            neighbours = None
            if config["style_shift"].get("neighbours"):
                neighbours = NeighbourVotes(
                    tensors["style_shift.neighbours.embeddings"],
                    tensors["style_shift.neighbours.label_index"],
                    len(labels),
                    int(config["style_shift"]["neighbours"]["k"]),
                    float(config["style_shift"]["neighbours"]["temperature"]),
                )
            style_shift = StyleShift(
                tensors["style_shift.prior_mix"],
                tensors["style_shift.bias"],
                float(config["style_shift"]["head_scale"]),
                tensors.get("style_shift.embedding_weight"),
                tensors.get("style_shift.vote_weight"),
                neighbours,
            )
        thresholds = Thresholds(**config["thresholds"])
        policy = InputPolicy(**config["policy"])
    except (KeyError, TypeError, ValueError) as e:
        raise RouterFileError(
            f"{folder}: inconsistent router files ({type(e).__name__}: {e})"
        ) from None
    if encoder is None:
        spec = config["encoder"]["spec"]
        if config["encoder"].get("bundled"):
            if not (folder / ENCODER_DIR).is_dir():
                raise RouterFileError(
                    f"{folder}: missing {ENCODER_DIR}/ (the encoder this router was tuned with)"
                )
            spec = {**spec, "name": str(folder / ENCODER_DIR)}
        if spec.get("kind") == "custom":
            raise EncoderMismatchError(
                f"{folder}: trained with a custom encoder {spec.get('name')!r}; pass it to load()"
            )
        encoder = build_encoder(spec)
    check_encoder(encoder, config, probe)
    n_out = head.logits(np.zeros((1, encoder.dim), dtype=np.float32)).shape[1]
    if n_out != len(labels):
        raise RouterFileError(f"{folder}: head has {n_out} outputs for {len(labels)} labels")
    sim = config.get("similarity_dim")
    if sim is not None and sim != similarity_dim(encoder):
        raise EncoderMismatchError(
            f"{folder}: the router reads the first {sim} columns as the sentence embedding, the "
            f"encoder gives {similarity_dim(encoder)}"
        )
    try:
        return Router(
            encoder=encoder,
            labels=labels,
            head=head,
            temperature=float(config["temperature"]),
            thresholds=thresholds,
            policy=policy,
            prior=prior,
            prior_weight=float(config["prior"]["weight"]) if config.get("prior") else 0.0,
            prototypes=prototypes,
            head_gate=head_gate,
            style_shift=style_shift,
            similarity_dim=sim,
            descriptions=config.get("descriptions", {}),
            base_label=config["base_label"],
            model_version=config["model_version"],
            batch_size=int(config.get("batch_size", 32)),
        )
    except (KeyError, TypeError, ValueError) as e:  # parts that disagree: a faulty writer
        raise RouterFileError(
            f"{folder}: inconsistent router files ({type(e).__name__}: {e})"
        ) from None
