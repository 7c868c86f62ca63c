"""The frozen exam-style checks: multiple-choice questions written for this project.

``exam`` (240 items: law 61, medical 59, code 59, base 61) was written before any of the router's
robustness work, over many sub-topics per label (bar-exam fact patterns, clinical vignettes,
pharmacology, public health; CS theory, pseudo-code, systems; mathematics, sciences, history,
economics, ...). ``exam2`` (480 items, 120 per label) was written later, by four writers who never
saw the router, in the composition of the held-back exam set of issue 13: long professional-law fact
patterns; clinical knowledge, college and professional medicine; college and high-school computer
science, computer security and machine learning; forty other school and professional subjects.
``exam3`` (480 items, 120 per label) was written after the current default was chosen, by four new
writers, in MMLU's subject mix and forms (many one-line stems), its ``base`` including the border
subjects ``exam2`` left out (anatomy, medical genetics, nutrition, jurisprudence, international
law, ...).
``exam4`` (480 items, ``exam3``'s composition) was written after the WordLlama default was chosen,
by four more new writers; first evaluated, both halves at once, on that default and on MiniLM
alone, it chose between the two (MiniLM alone, the default until ``exam5``).
``exam5`` (480 items, the same composition, four more new writers) was held back until a design
chosen on the other checks (the WordLlama one, by the held-back estimate: ``held_back.py``) was
confirmed on it; that look made it the default. ``exam6`` (480 items, the same composition, four
more new writers; questions close to an earlier check's rewritten before it was frozen) was then
read once to measure the default, no design having led it by the bar set beforehand. ``exam7`` and
``exam8`` (480 items each, the same composition and rule, four and five more new writers)
confirmed the style shift (``router.style_shift``): ``exam7`` its first design, ``exam8`` the
second, ``exam9`` (the same, five more new writers) the third, and ``exam10`` (the same, five more
new writers) the current one, with a linear term on the embedding, fitted on ``exam2`` to
``exam9``. ``exam11`` (the same, five more new writers) was then read once to measure that default
and to test one change set beforehand (``exam10`` joining the fit), which did not lead it by the bar;
``exam12`` (the same, five more new writers) to test a neighbour term in the shift, chosen by
leave-one-check-out over ``exam2`` to ``exam11``, which did not lead it either. ``exam13`` (the
same, five more new writers) confirmed a wider partly-open head gate (``head_gate.high_quantile``
0.25), chosen by leave-one-check-out over ``exam2`` to ``exam9``. ``exam14`` (the same, five more
new writers) tested that default with its shift fitted on ``exam2`` to ``exam13``, which did not lead
it; ``exam15`` (the same, five more new writers) confirmed it with its shift fitted on ``exam2`` to
``exam14``, chosen by leave-one-check-out over ``exam10`` to ``exam14``. ``exam16`` (the same, five
more new writers) was then read once to measure it; no choice was made on it. ``exam17`` (the same,
five more new writers) confirmed the current default, its shift fitted on ``exam2`` to ``exam16``
with a weaker embedding penalty, chosen by leave-one-check-out over ``exam10`` to ``exam16``;
``exam18`` (the same, five more new writers) was then read once to measure it. ``exam19`` (the same,
five more new writers) confirmed the current default, all-mpnet-base-v2 with its shift fitted on
``exam2`` to ``exam18``, chosen by leave-one-check-out over ``exam10`` to ``exam18``.
Rendered as the user would send them: the question, then ``A. ...`` to ``D. ...``. No answer key:
the router only needs the subject.

The head is never trained on them; the checks ``router.style_shift.checks`` names fit the style
shift, and their figures are then no longer those of unseen questions. Each label
is split in two by a hash of the item id: the ``dev`` half may be looked at while choosing the
design, the ``sealed`` half is evaluated once, at the end. A SHA-256 pins each file: an edited file
is refused, so later tuning cannot quietly change a check.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loralab.data.records import json_objects

HALVES = ("dev", "sealed")
# check name -> (file beside this module, its SHA-256)
EXAM_CHECKS = {
    "exam": (
        "exam_check.jsonl",
        "b2cda67afb3ad57ea153cd5561e0eabd2c02153c5537dcb999b9ad0e514d0e72",
    ),
    "exam2": (
        "exam_check_2.jsonl",
        "9196c5c5416530c7e026c268d9307c153806f5de8b50b65636a7e5af9fa6ce83",
    ),
    "exam3": (
        "exam_check_3.jsonl",
        "025b008d338b083373e97bd9a5e960037f77bfc9b636525843891213d3e67f5c",
    ),
    "exam4": (
        "exam_check_4.jsonl",
        "eb3f49c468967bf03f5e617424d91e8f251053d2279365fc9bbe82826e225201",
    ),
    "exam5": (
        "exam_check_5.jsonl",
        "1f71e4553fbaf9dc45949d36434b005109f0169a7cc5ac8f9ce6412f1fc62b2b",
    ),
    "exam6": (
        "exam_check_6.jsonl",
        "3ef3d662b5094cf4756cd75bce56225344da0f9e58957f64767e933b55a5153c",
    ),
    "exam7": (
        "exam_check_7.jsonl",
        "338ad24744368c3f87859de76dc354f7f76a4e0d780646ec2951d42663929b95",
    ),
    "exam8": (
        "exam_check_8.jsonl",
        "f97618e5446a3ac056f3091cb4b778bcf9485b74de6d0529978f63903708a799",
    ),
    "exam9": (
        "exam_check_9.jsonl",
        "dac642935a938633fcc24822d4c76a6004d322a729b5f0c2f89ae9b0c9f69d62",
    ),
    "exam10": (
        "exam_check_10.jsonl",
        "8853233f8076e94db5152fa49b82761a366a1308cffb65e70e222365df1941f4",
    ),
    "exam11": (
        "exam_check_11.jsonl",
        "9992138b34e023c14b90213e002cc7fcd4e7e215b575a699e5e19954155ab10b",
    ),
    "exam12": (
        "exam_check_12.jsonl",
        "0e9d9a11fb09d6f8f3385f1502dcb4414eecf2daf35d7dc8a69d0e35090b642e",
    ),
    "exam13": (
        "exam_check_13.jsonl",
        "04d2f173737231a0cce524f5b3e71918d03f2021ecc7630fb805af0a89adc900",
    ),
    "exam14": (
        "exam_check_14.jsonl",
        "f146c40b0dfbf9be553fa1163c4d53e027d8a4d8a495d15154b90cc3fb9ebb97",
    ),
    "exam15": (
        "exam_check_15.jsonl",
        "7a558885e843fc70afb0886153e59ffd7603d7a69b4f7e9adae409b414efeec1",
    ),
    "exam16": (
        "exam_check_16.jsonl",
        "6d72205903e4f50ce80bc4e2705f2fbc1b60d656c2befc3cb9cdba4bd8335e73",
    ),
    "exam17": (
        "exam_check_17.jsonl",
        "4aee504947fbe9546ecc203b45e57739e550e234f55b1f529f5ac8d278d62f4d",
    ),
    "exam18": (
        "exam_check_18.jsonl",
        "72c959c3f19b35a036fac17e0e54a159bafec0ef77bb714afd8377740ced0f50",
    ),
    "exam19": (
        "exam_check_19.jsonl",
        "770a8ea5828ae0d28b1e55cbaee19a2320754422fc561e8f576f40e2b400b50f",
    ),
}


def exam_check_file(check: str = "exam") -> Path:
    """The file of a frozen check."""
    if check not in EXAM_CHECKS:
        raise ValueError(f"unknown exam check {check!r}; known: {sorted(EXAM_CHECKS)}")
    return Path(__file__).with_name(EXAM_CHECKS[check][0])


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


def exam_items(
    half: str | None = None, check: str = "exam", path: Path | None = None
) -> list[ExamItem]:
    """A check's items (all, or one half), after verifying its file's SHA-256.

    ``path`` reads another copy of the check's file (still verified against the check's hash)."""
    if half is not None and half not in HALVES:
        raise ValueError(f"half must be one of {HALVES} or None, got {half!r}")
    frozen_file = exam_check_file(check)  # an unknown check is refused, path given or not
    path = path or frozen_file
    data = path.read_bytes()
    digest, frozen = hashlib.sha256(data).hexdigest(), EXAM_CHECKS[check][1]
    if digest != frozen:
        raise ExamCheckModifiedError(
            f"{path}: SHA-256 {digest} differs from the frozen {frozen}; the exam check "
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


def request_lines(items: Iterable[ExamItem]) -> list[str]:
    """One JSON line per item, ``{"id", "text"}``, as ``python -m router route`` reads them (no
    label: the router sees only the text; its decisions echo the id back)."""
    return [json.dumps({"id": i.id, "text": i.text}, ensure_ascii=False) for i in items]


class DecisionsFileError(ValueError):
    """A decisions file that does not answer a check's requests one to one."""


def read_decisions(
    items: Sequence[ExamItem], lines: Iterable[str], source: str
) -> dict[str, dict[str, Any]]:
    """Item id -> its decision (a ``python -m router route`` output line: ``id`` and ``label``).

    Every item must be answered exactly once and every decision must answer an item; ``source``
    names the file in the errors (with the line number)."""
    by_id = {i.id: i for i in items}
    decided: dict[str, dict[str, Any]] = {}
    for n, d in json_objects(lines, source, DecisionsFileError):
        if "id" not in d or "label" not in d:
            raise DecisionsFileError(f"{source}:{n}: a decision needs the fields 'id' and 'label'")
        item_id = str(d["id"])
        if item_id not in by_id:
            raise DecisionsFileError(f"{source}:{n}: id {item_id!r} is not a question of the check")
        if item_id in decided:
            raise DecisionsFileError(f"{source}:{n}: id {item_id!r} decided twice")
        decided[item_id] = d
    missing = [i.id for i in items if i.id not in decided]
    if missing:
        raise DecisionsFileError(
            f"{source}: {len(missing)} of {len(items)} questions have no decision "
            f"(first: {', '.join(missing[:3])})"
        )
    return decided


def score_decisions(items: Sequence[ExamItem], lines: Iterable[str], source: str) -> dict[str, Any]:
    """Accuracy of routed decisions (read by :func:`read_decisions`; ``label`` is the final
    decision, so an abstention counts as ``base``) against ``items``' labels: overall, per half,
    recall per label, the mistakes as ``gold -> decided`` counts and by decision ``reason``."""
    decided = read_decisions(items, lines, source)

    def accuracy(subset: Sequence[ExamItem]) -> dict[str, Any]:
        correct = sum(decided[i.id]["label"] == i.label for i in subset)
        return {"n": len(subset), "correct": correct, "accuracy": correct / max(1, len(subset))}

    wrong = [i for i in items if decided[i.id]["label"] != i.label]
    return {
        **accuracy(items),
        "halves": {
            h: accuracy([i for i in items if i.half == h])
            for h in HALVES
            if any(i.half == h for i in items)
        },
        "recall": {
            lab: accuracy([i for i in items if i.label == lab])["accuracy"]
            for lab in dict.fromkeys(i.label for i in items)
        },
        "mistakes": dict(
            Counter(f"{i.label} -> {decided[i.id]['label']}" for i in wrong).most_common()
        ),
        "mistakes_by_reason": dict(
            Counter(str(decided[i.id].get("reason")) for i in wrong).most_common()
        ),
    }
