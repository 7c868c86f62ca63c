"""The request router's probabilities as a prior on MoE-LoRA's token gate (``moelora_prior``).

The router gives each request ``p(label)`` over the experts' domains and ``base``. The gate mixes
its slots (the experts, plus ``none`` when it has a null expert); the prior adds
``scale * log p(slot)`` to every layer's gate logits (``moelora.RowRouting.gate_bias``), so the
gate's token-level choice is weighted by the request-level one: probs ∝ p(slot)^scale ·
softmax(logits / T). The ``base`` mass goes to the ``none`` slot when the gate has one; without
it, it is spread evenly over the experts (a request the router sends to the base model puts no
preference on the gate, which then routes on its own).

``RouterPriors`` routes records once and caches their probabilities in a JSON file keyed by the
router's model version, so the gate's training data is routed once per router.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loralab.data.records import BASE_LABEL, Record
from loralab.io_utils import atomic_write_json

log = logging.getLogger(__name__)

NONE_SLOT = "none"  # moelora's null-expert slot


def slot_probs(probs: Mapping[str, float], slots: Sequence[str]) -> np.ndarray:
    """The router's ``probs`` (label -> p) as probabilities over the gate ``slots`` [S]; uniform
    when ``probs`` is empty (no decision: no preference)."""
    experts = [s for s in slots if s != NONE_SLOT]
    if not probs:
        return np.full(len(slots), 1.0 / len(slots))
    base = float(probs.get(BASE_LABEL, 0.0))
    spread = 0.0 if NONE_SLOT in slots else base / max(1, len(experts))
    out = np.array([base if s == NONE_SLOT else float(probs.get(s, 0.0)) + spread for s in slots])
    total = out.sum()
    return out / total if total > 0 else np.full(len(slots), 1.0 / len(slots))


def gate_bias(p_slots: Any, scale: float, floor: float) -> Any:
    """``scale * log(max(p, floor))`` [..., S] (numpy array or torch tensor): the gate-logit
    prior of slot probabilities; the floor keeps a slot the router rules out reachable."""
    if scale < 0 or not 0 < floor < 1:
        raise ValueError(f"prior scale must be >= 0 and floor in (0, 1), got {scale}, {floor}")
    if isinstance(p_slots, np.ndarray):
        return scale * np.log(np.maximum(p_slots, floor))
    return scale * p_slots.clamp_min(floor).log()


class RouterPriors:
    """Router probabilities per record id, routed once and cached in ``cache_file`` (JSON)."""

    def __init__(self, router_dir: str | Path, cache_file: str | Path | None = None) -> None:
        import router

        self.router: Any = router.load(router_dir)
        self.model_version = str(self.router.model_version)
        self.cache_file = None if cache_file is None else Path(cache_file)
        self.probs: dict[str, dict[str, float]] = {}
        if self.cache_file is not None and self.cache_file.is_file():
            saved = json.loads(self.cache_file.read_text(encoding="utf-8"))
            if saved.get("model_version") == self.model_version:
                self.probs = {str(k): dict(v) for k, v in saved["probs"].items()}
            else:
                log.info("%s: routed by another router version; routing again", self.cache_file)

    def prepare(self, records: Sequence[Record]) -> int:
        """Route the records not routed yet (one batch call); returns how many were routed."""
        todo = list({r.id: r for r in records if r.id not in self.probs}.values())
        if todo:
            decisions = self.router.route_batch([r.instruction for r in todo])
            for r, d in zip(todo, decisions, strict=True):
                self.probs[r.id] = {str(k): float(v) for k, v in (d.probs or {}).items()}
            if self.cache_file is not None:
                atomic_write_json(
                    self.cache_file, {"model_version": self.model_version, "probs": self.probs}
                )
        log.info("router priors: %d records routed, %d from the cache", len(todo),
                 len(records) - len(todo))  # fmt: skip
        return len(todo)

    def release(self) -> None:
        """Drop the router (its encoder) once every record is prepared."""
        self.router = None

    def of(self, record: Record, slots: Sequence[str]) -> tuple[float, ...]:
        """Slot probabilities of a prepared record."""
        return tuple(float(p) for p in slot_probs(self.probs[record.id], slots))
