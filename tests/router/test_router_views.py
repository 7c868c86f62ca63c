"""Generated training views and the frozen exam check."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from loralab.data.records import Record
from loralab.routing import views as gen
from loralab.routing.datasets import ViewPools, question_of, record_views
from loralab.routing.exam_check import (
    ExamCheckModifiedError,
    exam_check_file,
    exam_items,
    halves,
)

LABELS = ("law", "code", "medical", "base")

SYMPTOMS = Record(
    "med-1",
    "medical",
    "What are the symptoms of Foo syndrome?",
    "What are the signs and symptoms of Foo syndrome? Signs may include: - Fever. - Joint pain. "
    "- Night sweats. - Weight loss.",
    "abachaa/MedQuAD:x",
)


def _pool(n: int) -> tuple[str, ...]:
    return tuple(f"Answer number {i}" for i in range(n))


def test_multiple_choice_has_the_answer_once_among_four_distinct_options() -> None:
    text = gen.multiple_choice("rec-7", "Which one?", "The right answer", _pool(20))
    assert text is not None
    lines = text.splitlines()
    assert lines[0] == "Which one?" and len(lines) == 5
    options = [re.sub(r"^\(?[A-D][.)]\)? ?", "", line) for line in lines[1:]]
    assert options.count("The right answer") == 1 and len(set(options)) == 4
    assert [line[:3].strip("(")[0] for line in lines[1:]] == ["A", "B", "C", "D"]
    # deterministic: the same key gives the same text, another key (almost surely) another
    assert gen.multiple_choice("rec-7", "Which one?", "The right answer", _pool(20)) == text
    assert any(
        gen.multiple_choice(f"rec-{k}", "Which one?", "The right answer", _pool(20)) != text
        for k in range(8, 12)
    )


def test_multiple_choice_needs_three_distractors() -> None:
    assert gen.multiple_choice("k", "Q?", "a", ("a", "b", "c")) is None


def test_first_sentence_skips_a_repeated_question_and_cuts_on_a_word() -> None:
    assert gen.first_sentence("What is X? X is a rare disease. It is inherited.") == (
        "X is a rare disease"
    )
    cut = gen.first_sentence("word " * 60, max_chars=22)
    assert cut == "word word word word" and len(cut) <= 22
    assert gen.first_sentence("  \n ") is None


def test_prose_sentences_drop_code_and_bullets() -> None:
    text = "The function sorts the list in place.\n\n```python\nx = sorted(y)\n```\n- a bullet item here."
    assert gen.prose_sentences(text, min_chars=10) == ["The function sorts the list in place."]


def test_vignette_from_a_symptom_record() -> None:
    disease, symptoms = gen.symptoms_disease(SYMPTOMS.instruction, SYMPTOMS.response) or ("", [])
    assert disease == "Foo syndrome"
    assert symptoms == ["fever", "joint pain", "night sweats", "weight loss"]
    text = gen.vignette("med-1", disease, symptoms, ["Bar disease", "Baz", "Qux", "Foo syndrome"])
    assert text is not None
    first = text.splitlines()[0]
    assert re.fullmatch(
        r"A \d+-year-old (man|woman|patient) presents with [a-z ,]+ and [a-z ]+\. What is the most "
        r"likely diagnosis\?",
        first,
    )
    assert "Foo syndrome" in text and text.count("Foo syndrome") == 1
    assert gen.symptoms_disease("What causes Foo?", SYMPTOMS.response) is None


def test_record_views_generated_only_with_pools() -> None:
    views = ["instruction", "multiple_choice", "vignette", "response_sentence"]
    assert [v for v, _ in record_views(SYMPTOMS, views, 20)] == ["instruction"]
    pools = ViewPools(answers=_pool(10), diseases=("A", "B", "C", "D"))
    got = dict(record_views(SYMPTOMS, views, 20, pools))
    assert set(got) == {"instruction", "multiple_choice", "vignette"}  # no prose sentence in a list
    assert got["multiple_choice"].startswith("What are the symptoms of Foo syndrome?\n")


def test_question_of_prefers_the_asking_paragraph_and_drops_field_names() -> None:
    r = Record("g", "general", "Why is the sky blue?\n\nLong context about light.", "x", "s")
    assert question_of(r) == "Why is the sky blue?"
    r = Record("l", "law", "Template preamble.\n\nQ: Did the trial court err", "x", "s")
    assert question_of(r) == "Did the trial court err"


@pytest.mark.parametrize(
    ("check", "per_label"),
    [
        ("exam", {"law": 61, "code": 59, "medical": 59, "base": 61}),
        ("exam2", dict.fromkeys(LABELS, 120)),
        ("exam3", dict.fromkeys(LABELS, 120)),
        ("exam4", dict.fromkeys(LABELS, 120)),
        ("exam5", dict.fromkeys(LABELS, 120)),
        ("exam6", dict.fromkeys(LABELS, 120)),
        ("exam7", dict.fromkeys(LABELS, 120)),
        ("exam8", dict.fromkeys(LABELS, 120)),
        ("exam9", dict.fromkeys(LABELS, 120)),
        ("exam10", dict.fromkeys(LABELS, 120)),
        ("exam11", dict.fromkeys(LABELS, 120)),
        ("exam12", dict.fromkeys(LABELS, 120)),
        ("exam13", dict.fromkeys(LABELS, 120)),
        ("exam14", dict.fromkeys(LABELS, 120)),
        ("exam15", dict.fromkeys(LABELS, 120)),
        ("exam16", dict.fromkeys(LABELS, 120)),
        ("exam17", dict.fromkeys(LABELS, 120)),
        ("exam18", dict.fromkeys(LABELS, 120)),
        ("exam19", dict.fromkeys(LABELS, 120)),
    ],
)
def test_exam_checks_are_frozen_and_split_in_stable_halves(
    tmp_path: Path, check: str, per_label: dict[str, int]
) -> None:
    items = exam_items(check=check)
    assert len({i.id for i in items}) == len(items) == sum(per_label.values())
    assert {lab: sum(i.label == lab for i in items) for lab in per_label} == per_label
    dev, sealed = exam_items("dev", check), exam_items("sealed", check)
    assert len(dev) + len(sealed) == len(items) and not {i.id for i in dev} & {i.id for i in sealed}
    for label, n in per_label.items():
        assert sum(i.label == label for i in dev) == n // 2
    first = items[0]
    assert first.text.splitlines()[0] == first.question.splitlines()[0]
    assert first.text.splitlines()[-4] == f"A. {first.options[0]}"
    # the split is a function of the ids alone
    assert halves([(i.id, i.label) for i in items]) == {i.id: i.half for i in items}
    edited = tmp_path / "exam.jsonl"
    data = exam_check_file(check).read_bytes()
    edited.write_bytes(data.replace(b'"law"', b'"base"', 1))
    with pytest.raises(ExamCheckModifiedError, match="SHA-256"):
        exam_items(check=check, path=edited)
    with pytest.raises(ValueError, match="half"):
        exam_items("train", check)
    with pytest.raises(ValueError, match="unknown exam check 'exam20'"):
        exam_items(check="exam20")
