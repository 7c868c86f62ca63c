"""Shared test inputs: a toy corpus whose labels the hashing encoder separates by vocabulary.

Importable from the tests because pytest puts this folder on ``sys.path``.
"""

from __future__ import annotations

import random
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from router import HashingEncoder, InputPolicy, Router
from router.classifier import LinearHead
from router.encoders import Encoder
from router.fitting import FitConfig, fit_router

LABELS = ("law", "code", "medical", "base")
VOCAB = {
    "law": [
        "court",
        "statute",
        "contract",
        "plaintiff",
        "defendant",
        "tenant",
        "lease",
        "breach",
        "liability",
        "judge",
        "appeal",
        "tort",
    ],
    "code": [
        "python",
        "function",
        "array",
        "loop",
        "compile",
        "class",
        "bug",
        "recursion",
        "string",
        "integer",
        "sort",
        "algorithm",
    ],
    "medical": [
        "patient",
        "symptoms",
        "fever",
        "diagnosis",
        "treatment",
        "dose",
        "insulin",
        "tumor",
        "infection",
        "cardiac",
        "pain",
    ],
    "base": [
        "capital",
        "poem",
        "recipe",
        "garden",
        "holiday",
        "movie",
        "travel",
        "football",
        "painting",
        "music",
        "river",
        "mountain",
    ],
}
FILLER = ["the", "a", "of", "what", "how", "is", "about", "please", "explain"]
DESCRIPTIONS = {
    "law": ["a question about a court case, a statute or a contract"],
    "code": ["a programming question about a python function or an algorithm"],
    "medical": ["a medical question about a patient, symptoms and treatment"],
    "base": ["a general question about travel, music, movies or a recipe"],
}
QUESTIONS = {
    "law": "the plaintiff sued the defendant in court for breach of the lease contract",
    "code": "fix the bug in this python function that sorts an integer array with recursion",
    "medical": "the patient has fever and cardiac pain, what diagnosis and treatment dose",
    "base": "suggest a holiday travel plan with a mountain river and a movie",
}


def toy_texts(label: str, n: int, seed: int) -> list[str]:
    rng = random.Random(f"{label}-{seed}")
    words = VOCAB[label] + FILLER
    return [" ".join(rng.choice(words) for _ in range(rng.randint(6, 14))) for _ in range(n)]


def toy_split(encoder: Encoder, n_per_label: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings ``(4 n, dim)`` and label ids of ``n_per_label`` toy texts per label."""
    texts: list[str] = []
    y: list[int] = []
    for k, label in enumerate(LABELS):
        texts += toy_texts(label, n_per_label, seed)
        y += [k] * n_per_label
    return encoder.encode(texts), np.asarray(y)


def rotated_style_set(encoder: Encoder) -> tuple[np.ndarray, np.ndarray]:
    """Toy texts whose labels are rotated (law texts labelled code, ...): another style's labels."""
    x, y = toy_split(encoder, 15, seed=2)
    return x, (y + 1) % len(LABELS)


def fit_toy_router(
    encoder: Encoder,
    x_style: np.ndarray | None = None,
    y_style: np.ndarray | None = None,
    style_groups: Sequence[str] | None = None,
    style_weight: np.ndarray | None = None,
    **config: Any,
) -> Router:
    """A router fitted on the toy corpus (60 texts per label, 20 for validation): routes
    ``QUESTIONS[label]`` to ``label``. ``config``: ``FitConfig`` fields over the tests' defaults;
    ``x_style`` / ``y_style`` (``style_groups``): requests of another style for a style shift."""
    x_train, y_train = toy_split(encoder, 60, seed=0)
    x_val, y_val = toy_split(encoder, 20, seed=1)
    fit = {"c": 10.0, "prior_weight": 0.5, "prototypes_per_label": 8, **config}
    return fit_router(
        encoder,
        LABELS,
        x_train,
        y_train,
        x_val,
        y_val,
        descriptions=DESCRIPTIONS,
        policy=InputPolicy(),
        config=FitConfig(**fit),
        x_style=x_style,
        y_style=y_style,
        style_groups=style_groups,
        style_weight=style_weight,
    )


def router_with_probs(probs: np.ndarray, labels: tuple[str, ...] = LABELS) -> Router:
    """A router whose calibrated probabilities for the basis embedding ``e_i`` are ``probs[i]``.

    ``probs`` ``(n, n_labels)``: rows sum to 1 with no zero entry. Route ``np.eye(n)`` through
    ``decide_embeddings`` to get the decisions of a hand-written validation set.
    """
    weight = np.log(probs).T  # (n_labels, n): logits of e_i = log probs[i]
    head = LinearHead(weight, np.zeros(len(labels)))
    return Router(encoder=HashingEncoder(), labels=labels, head=head)


def exam_checks_script(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """``python scripts/exam_checks.py <args>`` from the repository root, output captured."""
    return subprocess.run(
        [sys.executable, "scripts/exam_checks.py", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
