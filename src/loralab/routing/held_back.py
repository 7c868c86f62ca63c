"""An estimate of a router's accuracy on issue 13's held-back set, re-weighted from our checks.

The held-back set (800 real exam questions, 200 per label) is measured outside the project. One
design was measured both there and on our MMLU-style checks: the router issue 13 measured
(``36f95d9``'s defaults, model version ``437922f086b5``). ``held_back_reference.json`` keeps its
confusion on the held-back set (from the issue) and its decisions on ``exam2`` to ``exam19`` (that
commit's ``python -m router route``, one check per call).

Each check question falls in a stratum: (gold label, the reference design's decision). Within a
stratum, a candidate's accuracy on the checks stands for its accuracy on the held-back questions of
that stratum, and the held-back set's count of them is the weight: post-stratification on how the
reference design behaved. The checks' ``base`` is harder than the held-back set's and their medical
questions easier (for the reference: 0.46 and 0.85 recall on ``exam3`` + ``exam4``, 0.80 and 0.67
held back); this corrects for as much of that as shows in the reference's decisions. A stratum with
fewer than ``MIN_STRATUM`` check questions borrows the candidate's accuracy on all the reference's
mistakes of that gold label; where those are too few as well (the reference sent three of the
checks' ``law`` questions to ``base``, 26 held back) it borrows from the reference's mistakes of
every label, and ``bounds`` say how far such strata can move the estimate (none to all of them
right). ``MIN_STRATUM`` was 3 until ``exam13`` brought that stratum its third question: three
questions standing for 26 held-back ones moved a design's estimate by up to 1.5 points and more
than doubled its interval.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

REFERENCE_FILE = Path(__file__).with_name("held_back_reference.json")
MIN_STRATUM = 10  # check questions a stratum needs to stand for itself
OTHER = "other"  # the reference's held-back mistakes of a label that issue 13 does not break down


@dataclass(frozen=True)
class HeldBackReference:
    design: str
    confusion: dict[str, dict[str, int]]  # gold -> reference decision (or ``other``) -> count
    decisions: dict[str, dict[str, str]]  # check -> item id -> reference decision


def load_reference(path: Path = REFERENCE_FILE) -> HeldBackReference:
    """The reference design's held-back confusion and its decisions on the checks."""
    data = json.loads(path.read_text(encoding="utf-8"))
    return HeldBackReference(data["design"], data["held_back"]["confusion"], data["decisions"])


def stratum_weights(
    gold: Sequence[str],
    reference: Sequence[str],
    confusion: Mapping[str, Mapping[str, int]],
    min_n: int = MIN_STRATUM,
) -> np.ndarray:
    """``(n,)`` weights, mean 1, that give the check questions of each stratum (their gold label,
    the reference's decision ``reference[i]``) that stratum's share of the held-back set: held-back
    count / check count. A stratum with fewer than ``min_n`` check questions, or none held back,
    keeps the neutral weight (held-back total / check total), as the estimate does not let it stand
    for itself either."""
    if len(gold) != len(reference) or not len(gold):
        raise ValueError(f"{len(gold)} gold labels for {len(reference)} reference decisions")
    cells = Counter(zip(gold, reference, strict=True))
    held_total = sum(sum(row.values()) for row in confusion.values())
    neutral = held_total / len(gold)
    weight = {}
    for (g, r), n in cells.items():
        held = confusion.get(g, {}).get(r, 0)
        weight[g, r] = held / n if n >= min_n and held else neutral
    w = np.array([weight[g, r] for g, r in zip(gold, reference, strict=True)])
    return w / w.mean()


class Outcome(NamedTuple):
    gold: str
    reference: str  # the reference design's decision on the question
    correct: bool  # whether the candidate decided the gold label


Cells = Mapping[tuple[str, str], np.ndarray]  # (gold, reference decision) -> candidate correct


class NotEnoughChecks(ValueError):
    """The checks hold too few questions to estimate a stratum of the held-back set."""


def _per_label(
    cells: Cells, confusion: Mapping[str, Mapping[str, int]], min_n: int, unseen: float | None
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Held-back accuracy per gold label; ``unseen`` replaces the borrowed accuracy of strata the
    checks do not hold for that label (None: the candidate's accuracy on all reference mistakes)."""
    empty = np.zeros(0, dtype=bool)
    wrong_of = {
        g: np.concatenate([empty, *(v for (gg, r), v in cells.items() if gg == g and r != g)])
        for g in confusion
    }
    wrong_all = np.concatenate([empty, *wrong_of.values()])
    per_label, strata = {}, []
    for gold, row in confusion.items():
        total = 0.0
        for ref, held_n in row.items():
            cell = cells.get((gold, ref), empty)
            if ref != OTHER and len(cell) >= min_n:
                acc, source = float(cell.mean()), "stratum"
            elif ref != gold and len(wrong_of[gold]) >= min_n:
                acc, source = float(wrong_of[gold].mean()), f"{gold} mistakes"
            elif ref != gold and len(wrong_all) >= min_n:
                acc = float(wrong_all.mean()) if unseen is None else unseen
                source = "all mistakes"
            else:
                raise NotEnoughChecks(
                    f"held-back stratum {gold} -> {ref}: the checks hold {len(cell)} such "
                    f"questions (need {min_n})"
                )
            total += held_n * acc
            strata.append(
                {
                    "gold": gold,
                    "reference": ref,
                    "held_back_n": held_n,
                    "checks_n": len(cell),
                    "accuracy": acc,
                    "from": source,
                }
            )
        per_label[gold] = total / sum(row.values())
    return per_label, strata


def estimate_held_back(
    outcomes: Sequence[Outcome],
    confusion: Mapping[str, Mapping[str, int]],
    min_n: int = MIN_STRATUM,
    n_resamples: int = 2000,
    seed: int = 0,
    baseline: Sequence[bool] | None = None,
) -> dict[str, Any]:
    """The candidate's estimated held-back accuracy (labels weighted by their held-back counts),
    per label, the strata it rests on, ``bounds`` (strata the checks lack at 0 and at 1 right) and a
    95 % percentile interval from resampling the check questions within each stratum.

    ``baseline[i]``: whether another design decided ``outcomes[i]``'s question right. Its estimate
    and the candidate's lead over it are added, the lead's interval from the same resamples (paired:
    both designs on the same questions)."""
    if min_n < 1:
        raise ValueError(f"min_n must be at least 1, got {min_n}")
    if baseline is not None and len(baseline) != len(outcomes):
        raise ValueError(f"{len(baseline)} baseline outcomes for {len(outcomes)} questions")
    keys = sorted({(o.gold, o.reference) for o in outcomes})
    index = {
        k: np.array([i for i, o in enumerate(outcomes) if (o.gold, o.reference) == k]) for k in keys
    }
    designs = [np.array([o.correct for o in outcomes])]
    if baseline is not None:
        designs.append(np.asarray(baseline, dtype=bool))
    weight = {g: sum(row.values()) for g, row in confusion.items()}

    def overall(per_label: Mapping[str, float]) -> float:
        return sum(weight[g] * a for g, a in per_label.items()) / sum(weight.values())

    def cells(correct: np.ndarray, idx: Mapping[tuple[str, str], np.ndarray]) -> Cells:
        return {k: correct[i] for k, i in idx.items()}

    points = [_per_label(cells(c, index), confusion, min_n, None) for c in designs]
    # A stratified bootstrap by hand: scipy.stats.bootstrap needs two or more items per sample,
    # and some strata hold one question.
    rng = np.random.default_rng(seed)
    resampled = np.empty((n_resamples, len(designs)))
    for r in range(n_resamples):
        idx = {k: i[rng.integers(0, len(i), len(i))] for k, i in index.items()}
        for d, c in enumerate(designs):
            resampled[r, d] = overall(_per_label(cells(c, idx), confusion, min_n, None)[0])

    def interval(x: np.ndarray) -> list[float]:
        return [float(q) for q in np.percentile(x, [2.5, 97.5])]

    low, high = (
        overall(_per_label(cells(designs[0], index), confusion, min_n, u)[0]) for u in (0.0, 1.0)
    )
    out: dict[str, Any] = {
        "estimate": overall(points[0][0]),
        "per_label": points[0][0],
        "interval_95": interval(resampled[:, 0]),
        "bounds": [low, high],
        "checks_n": len(outcomes),
        "checks_accuracy": float(designs[0].mean()),
        "strata": points[0][1],
    }
    if baseline is not None:
        out["baseline"] = {
            "estimate": overall(points[1][0]),
            "per_label": points[1][0],
            "interval_95": interval(resampled[:, 1]),
            "checks_accuracy": float(designs[1].mean()),
        }
        out["lead"] = {
            "estimate": out["estimate"] - out["baseline"]["estimate"],
            "interval_95": interval(resampled[:, 0] - resampled[:, 1]),
        }
    return out
