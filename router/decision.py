"""The router's answer for one request."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any


class Reason(str, Enum):
    """Why the router decided what it did. Every reason but ``confident`` routes to ``base``."""

    CONFIDENT = "confident"
    LOW_CONFIDENCE = "low_confidence"  # top probability under the fitted threshold
    LOW_MARGIN = "low_margin"  # top two probabilities too close
    OUT_OF_DISTRIBUTION = "out_of_distribution"  # far from everything seen in training
    EMPTY_INPUT = "empty_input"  # empty or whitespace-only text
    INVALID_INPUT = "invalid_input"  # not text, or binary-looking text
    NO_USER_TURN = "no_user_turn"  # a message list without a user message
    UNSUPPORTED_LANGUAGE = "unsupported_language"  # mostly non-Latin script for an English router


@dataclass(frozen=True)
class Decision:
    """One routing decision.

    ``label`` is what to serve (an expert or ``base``); ``predicted`` is the classifier's top label
    before abstention (None when the input never reached the classifier); ``probs`` are calibrated
    per-label probabilities (empty for bad input); ``margin`` = top - second probability;
    ``ood_score`` = cosine similarity to the nearest training prototype; ``latency_ms`` covers the
    whole decision (input policy, encoder, classifier) of this request, or its share of a batch.
    """

    label: str
    reason: Reason
    probs: dict[str, float] = field(default_factory=dict)
    margin: float = 0.0
    predicted: str | None = None
    ood_score: float | None = None
    model_version: str = ""
    latency_ms: float = 0.0
    detail: str = ""

    @property
    def abstained(self) -> bool:
        return self.reason is not Reason.CONFIDENT

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["reason"] = self.reason.value
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)
