"""The router's embedding cache: texts -> embeddings, stored per (encoder, text chunk) as ``.npy``.

``train_router`` embeds its sets label by label and view by view, so changing one label's cap or
adding a view re-encodes only those texts; a damaged cache file is re-encoded, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from loralab.routing.datasets import Example
from router.encoders import Encoder

log = logging.getLogger(__name__)


def cached_encode(
    encoder: Encoder,
    texts: Sequence[str],
    cache_dir: Path | None,
    batch_size: int,
    encoded: dict[str, int] | None = None,
    key: str = "",
) -> np.ndarray:
    """Embeddings of ``texts``, cached in ``cache_dir`` under a hash of (encoder, texts); a
    concatenated encoder's parts are cached apart (adding a static part re-encodes nothing else).
    ``encoded[key]`` (when given) counts the texts actually encoded (not found in the cache; a
    text counts once however many of its parts were encoded)."""
    parts = getattr(encoder, "parts", None)
    if parts is not None:
        per_part = [dict[str, int]() for _ in parts]
        x = np.hstack(
            [
                cached_encode(part, texts, cache_dir, batch_size, n, key)
                for part, n in zip(parts, per_part, strict=True)
            ]
        )
        if encoded is not None:
            encoded[key] = encoded.get(key, 0) + max(n[key] for n in per_part)
        return x
    if encoded is not None:
        encoded.setdefault(key, 0)
    if cache_dir is None:
        if encoded is not None:
            encoded[key] += len(texts)
        return encoder.encode(texts, batch_size=batch_size)
    h = hashlib.sha256(json.dumps(encoder.fingerprint(), sort_keys=True).encode())
    for t in texts:
        h.update(t.encode("utf-8", "replace") + b"\0")
    path = cache_dir / f"{h.hexdigest()[:24]}.npy"
    if path.is_file():
        try:
            x = np.load(path, allow_pickle=False)
            if x.shape == (len(texts), encoder.dim):
                return x
        except (OSError, ValueError) as e:  # a damaged cache file is re-encoded, never trusted
            log.warning("ignoring unreadable embedding cache %s (%s)", path, e)
    t0 = time.perf_counter()
    if encoded is not None:
        encoded[key] += len(texts)
    x = encoder.encode(texts, batch_size=batch_size)
    log.info("encoded %d texts in %.1fs", len(texts), time.perf_counter() - t0)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{time.time_ns()}.tmp.npy")
    np.save(tmp, x)
    tmp.replace(path)
    return x


def embed_examples(
    encoder: Encoder,
    examples: Sequence[Example],
    labels: Sequence[str],
    cache: Path | None,
    batch: int,
    encoded: dict[str, int] | None = None,
) -> tuple[np.ndarray, np.ndarray, list[Example]]:
    """Embeddings ``(n, dim)``, label ids ``(n,)`` and the examples in row order (label by label,
    view by view; cached per label and view, so changing one label's cap or adding a view
    re-encodes only those texts)."""
    xs, ys, rows = [], [], []
    for k, label in enumerate(labels):
        of_label = [e for e in examples if e.label == label]
        for view in dict.fromkeys(e.view for e in of_label):
            chunk = [e for e in of_label if e.view == view]
            texts = [e.text for e in chunk]
            xs.append(cached_encode(encoder, texts, cache, batch, encoded, label))
            ys.append(np.full(len(chunk), k))
            rows += chunk
    return np.concatenate(xs), np.concatenate(ys), rows
