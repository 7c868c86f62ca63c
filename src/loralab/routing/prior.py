"""The request router's probabilities as a prior on MoE-LoRA's token gate (``moelora_prior``).

The router gives each request ``p(label)`` over the experts' domains and ``base``. The gate mixes
its slots (the experts, plus ``none`` when it has a null expert); the prior adds
``scale * log p(slot)`` to every layer's gate logits (``moelora.RowRouting.gate_bias``), so the
gate's token-level choice is weighted by the request-level one: probs ∝ p(slot)^scale ·
softmax(logits / T). The ``base`` mass goes to the ``none`` slot when the gate has one; without
it, it is spread evenly over the experts (a request the router sends to the base model puts no
preference on the gate, which then routes on its own).

Pooling (``moelora.prior.pool``): ``request`` routes the whole request once; ``segments`` routes
each of its paragraphs (``request_segments``) and averages their probabilities weighted by length.
A request that asks two things in two paragraphs gets a prior split between its two domains (the
whole-request decision names one of them with confidence), and the gate chooses between those two
token by token; a single-domain request keeps a sharp prior (its paragraphs agree). ``agree``
applies the ``segments`` prior only when the paragraphs' top labels other than ``base`` name one
expert: a request whose paragraphs name two experts, or only ``base``, gets no prior, and the gate
routes it alone.

``RouterPriors`` routes records once and caches their probabilities in a JSON file keyed by the
router's model version, so the gate's training data is routed once per router.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loralab.data.records import BASE_LABEL, Record
from loralab.io_utils import atomic_write_json

log = logging.getLogger(__name__)

NONE_SLOT = "none"  # moelora's null-expert slot
POOLS = ("request", "segments", "agree")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


def request_segments(text: str, min_chars: int = 40, max_segments: int = 8) -> list[str]:
    """The request's paragraphs (split at blank lines) for routing one by one: a paragraph shorter
    than ``min_chars`` (a heading, "Part 2:") joins the next one (the last joins the one before);
    beyond ``max_segments`` the rest joins the last. A request without a blank line is one segment."""
    out: list[str] = []
    pending = ""
    for part in _PARAGRAPH_BREAK.split(text):
        part = f"{pending}\n\n{part.strip()}" if pending else part.strip()
        if not part:
            continue
        if len(part) < min_chars:
            pending = part
            continue
        pending = ""
        if len(out) == max_segments:
            out[-1] = f"{out[-1]}\n\n{part}"
        else:
            out.append(part)
    if pending:
        if out:
            out[-1] = f"{out[-1]}\n\n{pending}"
        else:
            out.append(pending)
    return out or [text]


def route_segments(
    router: Any, texts: Sequence[str], whole: Sequence[Any] | None = None
) -> list[list[tuple[int, dict[str, float]]]]:
    """Each text's segments (``request_segments``) as ``(characters, router probabilities)``,
    routed in one batch call. ``whole``: the texts' own decisions, if already made; a text that is
    its only segment takes its decision instead of being routed again."""
    segments = [request_segments(t) for t in texts]
    known = {
        k: whole[k]
        for k, (t, parts) in enumerate(zip(texts, segments, strict=True))
        if whole is not None and parts == [t]
    }
    todo = [s for k, parts in enumerate(segments) if k not in known for s in parts]
    fresh = iter(router.route_batch(todo) if todo else [])
    return [
        [(len(part), decision_probs(known[k] if k in known else next(fresh))) for part in parts]
        for k, parts in enumerate(segments)
    ]


def pool_segments(
    segments: Sequence[tuple[int, Mapping[str, float]]], pool: str
) -> dict[str, float]:
    """One text's segment probabilities pooled as ``segments`` (averaged, weighted by length) or
    ``agree`` (the same, when the segments' top labels other than ``base`` are one expert; else
    ``{}``: no prior). A segment without probabilities counts for nothing; none at all gives ``{}``."""
    total: dict[str, float] = {}
    weight = 0.0
    tops: set[str] = set()
    for n_chars, probs in segments:
        if probs:
            weight += n_chars
            tops.add(max(probs, key=lambda label: probs[label]))
            for label, p in probs.items():
                total[label] = total.get(label, 0.0) + n_chars * p
    if not weight or (pool == "agree" and len(tops - {BASE_LABEL}) != 1):
        return {}
    return {label: p / weight for label, p in total.items()}


def route_pooled(router: Any, texts: Sequence[str], pool: str) -> list[dict[str, float]]:
    """The router's label probabilities for each of ``texts``, pooled as ``pool`` says (one batch
    call for all texts or all their segments)."""
    if pool not in POOLS:
        raise ValueError(f"moelora.prior.pool must be one of {POOLS}, got {pool!r}")
    if pool == "request":
        return [decision_probs(d) for d in router.route_batch(list(texts))]
    return [pool_segments(parts, pool) for parts in route_segments(router, texts)]


def decision_probs(decision: Any) -> dict[str, float]:
    """A router decision's label probabilities (``{}`` when it gives none)."""
    return {str(k): float(v) for k, v in (decision.probs or {}).items()}


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
    """Router probabilities per record id (pooled as ``pool``), routed once and cached in
    ``cache_file`` (JSON, valid for the same router version and pooling)."""

    def __init__(
        self, router_dir: str | Path, cache_file: str | Path | None = None, pool: str = "request"
    ) -> None:
        import router

        if pool not in POOLS:
            raise ValueError(f"moelora.prior.pool must be one of {POOLS}, got {pool!r}")
        self.router: Any = router.load(router_dir)
        self.model_version = str(self.router.model_version)
        self.pool = pool
        self.cache_file = None if cache_file is None else Path(cache_file)
        self.probs: dict[str, dict[str, float]] = {}
        if self.cache_file is not None and self.cache_file.is_file():
            saved = json.loads(self.cache_file.read_text(encoding="utf-8"))
            key = (saved.get("model_version"), saved.get("pool", "request"))
            if key == (self.model_version, self.pool):
                self.probs = {str(k): dict(v) for k, v in saved["probs"].items()}
            else:
                log.info("%s: routed by another router version or pooling; routing again",
                         self.cache_file)  # fmt: skip

    def prepare(self, records: Sequence[Record]) -> int:
        """Route the records not routed yet (one batch call); returns how many were routed."""
        todo = list({r.id: r for r in records if r.id not in self.probs}.values())
        if todo:
            pooled = route_pooled(self.router, [r.instruction for r in todo], self.pool)
            for r, probs in zip(todo, pooled, strict=True):
                self.probs[r.id] = probs
            if self.cache_file is not None:
                saved = {"model_version": self.model_version, "pool": self.pool}
                atomic_write_json(self.cache_file, {**saved, "probs": self.probs})
        log.info("router priors: %d records routed, %d from the cache", len(todo),
                 len(records) - len(todo))  # fmt: skip
        return len(todo)

    def release(self) -> None:
        """Drop the router (its encoder) once every record is prepared."""
        self.router = None

    def of(self, record: Record, slots: Sequence[str]) -> tuple[float, ...]:
        """Slot probabilities of a prepared record."""
        return tuple(float(p) for p in slot_probs(self.probs[record.id], slots))
