"""The style shift's side of ``train_router``: which exam checks it is fitted on (checked against the
router's config), their questions embedded with their groups and optional stratum weights, and the
summary saved with the router of what it was fitted on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from loralab.routing.datasets import Example
from loralab.routing.embedding_cache import embed_examples
from loralab.routing.exam_check import HALVES, exam_items
from loralab.routing.held_back import REFERENCE_FILE, load_reference, stratum_weights
from router import Router
from router.encoders import Encoder
from router.fitting import FitConfig, off_style_rows


def style_shift_checks(rcfg: DictConfig) -> list[str]:
    """The exam checks ``router.style_shift.checks`` names (both halves fit the style shift);
    refused, before anything is encoded, where the router has no head gate or no prior for it."""
    checks = [str(c) for c in ((rcfg.get("style_shift") or {}).get("checks") or [])]
    if checks and (
        rcfg.get("head_gate") is None
        or not int(rcfg.ood_prototypes_per_label)
        or not float(rcfg.prior.weight)
    ):
        raise ValueError(
            f"router.style_shift.checks={checks} needs the head gate (router.head_gate, with "
            "router.ood_prototypes_per_label > 0) and the prior (router.prior.weight > 0); "
            "add router.style_shift.checks=[] to train without a style shift"
        )
    return checks


def exam_examples(check: str, half: str) -> list[Example]:
    """One half of a frozen exam check as labelled examples."""
    return [
        Example(i.text, i.label, f"{i.label}/{i.topic}", check) for i in exam_items(half, check)
    ]


@dataclass(frozen=True)
class StyleShiftSet:
    """The style shift's questions: embeddings ``(n, dim)``, label ids ``(n,)``, each question's
    check (a check's questions never vote for each other in the fit) and optional weights."""

    x: np.ndarray
    y: np.ndarray
    groups: list[str]
    weight: np.ndarray | None


def embed_style_shift(
    rcfg: DictConfig,
    checks: Sequence[str],
    encoder: Encoder,
    labels: Sequence[str],
    cache: Path | None,
    batch: int,
    encoded: dict[str, int],
) -> StyleShiftSet | None:
    """Both halves of ``checks`` embedded (None without checks), weighted to the held-back strata
    where ``router.style_shift.stratum_weights`` is set."""
    if not checks:
        return None
    # half by half: the same cache chunks as the evaluated halves, so nothing is encoded twice
    checks_halves = [(check, half) for check in checks for half in HALVES]
    parts = [
        embed_examples(encoder, exam_examples(check, half), labels, cache, batch, encoded)
        for check, half in checks_halves
    ]
    weight = None
    if (rcfg.get("style_shift") or {}).get("stratum_weights"):
        weight = _stratum_weights(checks_halves, [rows for _, _, rows in parts])
    return StyleShiftSet(
        x=np.concatenate([x for x, _, _ in parts]),
        y=np.concatenate([y for _, y, _ in parts]),
        groups=[c for (c, _), (_, y, _) in zip(checks_halves, parts, strict=True) for _ in y],
        weight=weight,
    )


def _stratum_weights(checks_halves: list[tuple[str, str]], rows: list[list[Example]]) -> np.ndarray:
    """The style shift's exam questions weighted to their strata's shares of the held-back set
    (``held_back.stratum_weights``, from the reference design's decisions on each check)."""
    reference = load_reference()
    gold, decided = [], []
    for (check, half), examples in zip(checks_halves, rows, strict=True):
        if check not in reference.decisions:
            raise ValueError(
                f"router.style_shift.stratum_weights: exam check {check!r} has no reference "
                f"decisions in {REFERENCE_FILE.name}"
            )
        id_of = {i.text: i.id for i in exam_items(half, check)}
        gold += [e.label for e in examples]
        decided += [reference.decisions[check][id_of[e.text]] for e in examples]
    return stratum_weights(gold, decided, reference.confusion)


def style_shift_summary(
    router: Router,
    checks: list[str],
    style: StyleShiftSet | None,
    x_train: np.ndarray,
    y_train: np.ndarray,
    fcfg: FitConfig,
) -> dict[str, Any] | None:
    """What the style shift was fitted on (those checks' figures are no longer those of unseen
    questions) and its parameters; None without one."""
    shift, gate = router.style_shift, router.head_gate
    if shift is None or gate is None:
        return None
    x_sim = x_train[:, : router.similarity_dim] if router.similarity_dim else x_train
    off = off_style_rows(gate, x_sim, y_train, router.labels, fcfg.style_shift_train_labels)
    return {
        "checks": checks,
        "n_questions": 0 if style is None else len(style.y),
        "stratum_weights": style is not None and style.weight is not None,
        "train_labels": list(fcfg.style_shift_train_labels),
        "n_training_texts": int(off.sum()),
        "n_training_texts_per_label": {
            label: int((off & (y_train == i)).sum()) for i, label in enumerate(router.labels)
        },
        "train_weight": fcfg.style_shift_train_weight,
        "embedding_l2": fcfg.style_shift_embedding_l2,
        "neighbours": None
        if shift.neighbours is None
        else {"k": shift.neighbours.k, "temperature": shift.neighbours.temperature},
        "vote_weight": None if shift.vote_weight is None else shift.vote_weight.tolist(),
        "head_scale": shift.head_scale,
        "bias": shift.bias.tolist(),
        "prior_mix": shift.prior_mix.tolist(),
    }
