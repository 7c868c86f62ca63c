"""``Router``: request -> ``Decision`` (an expert label or ``base``, with probabilities and a reason)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from router.calibration import Thresholds, softmax
from router.classifier import DescriptionPrior, Head, HeadGate, StyleShift, best_cosine
from router.decision import Decision, Reason
from router.encoders import Encoder
from router.inputs import BadInput, InputPolicy, check_text, clean_text, request_text


@dataclass(frozen=True)
class Scores:
    """Vectorised classifier outputs for ``n`` embeddings."""

    probs: np.ndarray  # (n, n_labels) calibrated
    ood: np.ndarray  # (n,) cosine to the nearest prototype (1.0 when there are none)


@dataclass
class Router:
    """A trained request router.

    ``logits = gate(x) * head(x) + prior_weight * prior(x)``, where ``gate(x)`` is 1 without a
    ``head_gate`` (with a ``style_shift``, as ``StyleShift`` combines them where the gate is not
    fully open); ``probs = softmax(logits / temperature)``.
    A request is routed to its top label unless it is bad input, out of distribution
    (``ood < thresholds.min_ood_score``) or an expert prediction with too low a probability or
    margin, in which case it goes to ``base_label`` and the decision says why.
    ``route`` / ``route_batch`` are safe to call from many threads (the encoder serialises its own
    calls; everything else is stateless numpy).
    """

    encoder: Encoder
    labels: tuple[str, ...]
    head: Head
    temperature: float = 1.0
    thresholds: Thresholds = field(default_factory=Thresholds)
    policy: InputPolicy = field(default_factory=InputPolicy)
    prior: DescriptionPrior | None = None
    prior_weight: float = 0.0
    prototypes: np.ndarray | None = None  # (p, sim) unit rows for the OOD score
    head_gate: HeadGate | None = None
    style_shift: StyleShift | None = None  # needs head_gate and prior
    # The leading columns of an embedding that the cosine-based parts (prior, gate, OOD) read;
    # the head reads them all. None: every column (a sentence encoder alone).
    similarity_dim: int | None = None
    descriptions: Mapping[str, Sequence[str]] = field(default_factory=dict)
    base_label: str = "base"
    model_version: str = "unsaved"
    batch_size: int = 32

    def __post_init__(self) -> None:
        self.labels = tuple(self.labels)
        if self.base_label not in self.labels:
            raise ValueError(f"base label {self.base_label!r} is not among labels {self.labels}")
        self._base_index = self.labels.index(self.base_label)
        if self.style_shift is not None and (
            self.head_gate is None or self.prior is None or not self.prior_weight
        ):
            raise ValueError("a style shift needs a head gate and a description prior")
        shift_weight = None if self.style_shift is None else self.style_shift.embedding_weight
        if shift_weight is not None and shift_weight.shape[1] != self.encoder.dim:
            raise ValueError(
                f"style shift embedding term reads {shift_weight.shape[1]} columns, the encoder "
                f"gives {self.encoder.dim}"
            )
        neighbours = None if self.style_shift is None else self.style_shift.neighbours
        sim = self.similarity_dim or self.encoder.dim
        if neighbours is not None and neighbours.embeddings.shape[1] != sim:
            raise ValueError(
                f"style shift neighbours have {neighbours.embeddings.shape[1]} columns, the "
                f"router's similarity columns {sim}"
            )

    # ----- scoring embeddings -------------------------------------------------------------------
    def _sentence(self, x: np.ndarray) -> np.ndarray:
        return x if self.similarity_dim is None else x[:, : self.similarity_dim]

    def logits(self, x: np.ndarray) -> np.ndarray:
        """``(n, dim)`` embeddings -> ``(n, n_labels)`` uncalibrated logits."""
        xs = self._sentence(x)
        z = self.head.logits(x)
        gate = None if self.head_gate is None else self.head_gate.weights(xs)
        prior = None
        if self.prior is not None and self.prior_weight:
            prior = self.prior_weight * self.prior.logits(xs)
        if self.style_shift is not None and gate is not None and prior is not None:
            votes, nb = None, self.style_shift.neighbours
            if nb is not None:  # only where the gate is not fully open does the shift act
                votes = np.zeros(z.shape, dtype=np.float32)
                off = gate < 1.0
                if off.any():
                    votes[off] = nb.votes(xs[off])
            return self.style_shift.logits(gate, z, prior, x, votes)
        if gate is not None:
            z = gate[:, None] * z
        return z if prior is None else z + prior

    def scores(self, x: np.ndarray) -> Scores:
        probs = softmax(self.logits(x), self.temperature)
        if self.prototypes is None or len(self.prototypes) == 0:
            ood = np.ones(len(x), dtype=np.float32)
        else:
            ood = best_cosine(self._sentence(x), self.prototypes)
        return Scores(probs, ood)

    def decide_embeddings(self, x: np.ndarray) -> list[Decision]:
        """Decisions for embeddings ``(n, dim)`` (no input checks, latency 0): for evaluation."""
        s = self.scores(x)
        return [self._decide(s.probs[i], float(s.ood[i])) for i in range(len(x))]

    def _decide(self, probs: np.ndarray, ood: float) -> Decision:
        order = np.argsort(-probs, kind="stable")
        top = int(order[0])
        margin = float(probs[top] - probs[order[1]]) if len(order) > 1 else 1.0
        t = self.thresholds
        if ood < t.min_ood_score:
            reason = Reason.OUT_OF_DISTRIBUTION
        elif top == self._base_index:
            reason = Reason.CONFIDENT
        elif probs[top] < t.min_confidence:
            reason = Reason.LOW_CONFIDENCE
        elif margin < t.min_margin:
            reason = Reason.LOW_MARGIN
        else:
            reason = Reason.CONFIDENT
        return Decision(
            label=self.labels[top] if reason is Reason.CONFIDENT else self.base_label,
            reason=reason,
            probs={name: float(p) for name, p in zip(self.labels, probs, strict=True)},
            margin=margin,
            predicted=self.labels[top],
            ood_score=ood,
            model_version=self.model_version,
        )

    def _bad(self, bad: BadInput) -> Decision:
        return Decision(
            label=self.base_label,
            reason=bad.reason,
            model_version=self.model_version,
            detail=bad.detail,
        )

    # ----- routing requests ---------------------------------------------------------------------
    def text_of(self, request: Any) -> str | BadInput:
        """The text the router would encode for ``request``, or why it will not encode it."""
        text = request_text(request, self.policy)
        if isinstance(text, BadInput):
            return text
        return check_text(text, self.policy) or clean_text(text)

    def route(self, request: Any) -> Decision:
        """Route one request: a string, a message list, or ``{"messages"|"text"|"prompt": ...}``."""
        return self.route_batch([request])[0]

    def route_batch(self, requests: Sequence[Any]) -> list[Decision]:
        """Route many requests with one encoder call; decisions come back in input order.

        Each decision's ``latency_ms`` is the batch's wall time divided by its size.
        """
        start = time.perf_counter()
        texts = [self.text_of(r) for r in requests]
        good = {i: t for i, t in enumerate(texts) if isinstance(t, str)}
        decisions: list[Decision] = []
        if good:
            s = self.scores(self.encoder.encode(list(good.values()), batch_size=self.batch_size))
            rows = dict(zip(good, range(len(good)), strict=True))
        for i, t in enumerate(texts):
            if isinstance(t, BadInput):
                decisions.append(self._bad(t))
            else:
                j = rows[i]
                decisions.append(self._decide(s.probs[j], float(s.ood[j])))
        share = (time.perf_counter() - start) * 1000.0 / max(1, len(requests))
        return [replace(d, latency_ms=share) for d in decisions]

    async def aroute(self, request: Any) -> Decision:
        """``route`` in a worker thread, so an event loop is never blocked by the encoder."""
        return await asyncio.to_thread(self.route, request)

    async def aroute_batch(self, requests: Sequence[Any]) -> list[Decision]:
        return await asyncio.to_thread(self.route_batch, requests)

    # ----- persistence --------------------------------------------------------------------------
    def save(
        self,
        path: str | Path,
        extra: Mapping[str, Any] | None = None,
        bundle_encoder: bool = False,
    ) -> str:
        """Write the router to folder ``path`` (atomically); returns its model version. With
        ``bundle_encoder`` (an encoder tuned for this router) its model folder goes with it."""
        from router.persistence import save_router

        return save_router(self, path, extra, bundle_encoder)

    @classmethod
    def load(cls, path: str | Path, encoder: Encoder | None = None) -> Router:
        """Load a router folder; builds its encoder unless one is given, and refuses one whose
        fingerprint differs from the encoder the router was trained with."""
        from router.persistence import load_router

        return load_router(path, encoder)
