"""The frozen exam-style check: 240 multiple-choice questions written for this project.

Four labels (law 61, medical 59, code 59, base 61) over many sub-topics (bar-exam fact patterns in
torts, criminal, constitutional, evidence, property, civil procedure, contracts; clinical vignettes,
pharmacology, physiology, mechanisms, public health; CS theory, complexity, pseudo-code, systems,
networking, databases; mathematics, sciences, history, economics, accounting, psychology, ...).
Rendered as the user would send them: the question, then ``A. ...`` to ``D. ...``. No answer key:
the router only needs the subject.

Written before any of the router's robustness work and never trained on. Each label is split in
two by a hash of the item id: the ``dev`` half may be looked at while choosing the design, the
``sealed`` half is evaluated once, at the end. ``EXAM_CHECK_SHA256`` pins the file: an edited file
is refused, so later tuning cannot quietly change the check.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

EXAM_CHECK_FILE = Path(__file__).with_name("exam_check.jsonl")
EXAM_CHECK_SHA256 = "b2cda67afb3ad57ea153cd5561e0eabd2c02153c5537dcb999b9ad0e514d0e72"
HALVES = ("dev", "sealed")


class ExamCheckModifiedError(RuntimeError):
    """The exam check file differs from the frozen one."""


@dataclass(frozen=True)
class ExamItem:
    id: str
    label: str
    topic: str
    question: str
    options: tuple[str, ...]
    half: str  # ``dev`` or ``sealed``

    @property
    def text(self) -> str:
        """The user text: the question and lettered options, one per line."""
        letters = "ABCDEFGH"
        return "\n".join(
            [self.question, *(f"{letters[i]}. {o}" for i, o in enumerate(self.options))]
        )


def halves(ids_and_labels: list[tuple[str, str]]) -> dict[str, str]:
    """Item id -> half: per label, ids ordered by their SHA-256; the first ``n // 2`` are ``dev``."""
    out = {}
    for label in sorted({lab for _, lab in ids_and_labels}):
        ids = sorted(
            (i for i, lab in ids_and_labels if lab == label),
            key=lambda s: hashlib.sha256(s.encode()).hexdigest(),
        )
        for k, item_id in enumerate(ids):
            out[item_id] = HALVES[0] if k < len(ids) // 2 else HALVES[1]
    return out


def exam_items(half: str | None = None, path: Path = EXAM_CHECK_FILE) -> list[ExamItem]:
    """The check's items (all, or one half), after verifying the file's SHA-256."""
    if half is not None and half not in HALVES:
        raise ValueError(f"half must be one of {HALVES} or None, got {half!r}")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != EXAM_CHECK_SHA256:
        raise ExamCheckModifiedError(
            f"{path}: SHA-256 {digest} differs from the frozen {EXAM_CHECK_SHA256}; the exam check "
            "must not be edited (write a new check with a new hash instead)"
        )
    rows = [json.loads(line) for line in data.decode("utf-8").splitlines()]
    half_of = halves([(r["id"], r["label"]) for r in rows])
    items = [
        ExamItem(
            r["id"], r["label"], r["topic"], r["question"], tuple(r["options"]), half_of[r["id"]]
        )
        for r in rows
    ]
    return [i for i in items if half is None or i.half == half]
