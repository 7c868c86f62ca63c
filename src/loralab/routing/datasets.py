"""Labelled texts for the router: train / val / test splits and an out-of-style check set.

Labels: each of ``data.domains`` from its domain file, ``base`` from ``general.jsonl``.
Splits come from ``loralab.data.records.split_of`` (a hash of the record id), so the router sees
the same test split as every other part of the lab and never trains on it.

Training text is broadened beyond the instruction itself (``views``): the instruction's last
paragraph (the actual question or fact pattern once a template's preamble is dropped) and long
responses (medical answers, code) carry the domain's vocabulary in other styles.

The out-of-style check set uses only material the router never trains on: whole LegalBench tasks
held out of every split (their fact patterns read like bar-exam questions), HumanEval / MBPP /
CoNaLa test prompts and PubMedQA test questions from ``eval/``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from loralab.data.records import (
    BASE_LABEL,
    GENERAL,
    Record,
    read_records,
    router_labels,
    split_of,
    spread_subset,
)
from loralab.routing import views as gen

VIEWS = (
    "instruction",
    "last_paragraph",
    "response",
    "multiple_choice",
    "vignette",
    "response_sentence",
)
GENERATED_VIEWS = ("multiple_choice", "vignette", "response_sentence")
_TASK = re.compile(r"tasks/([^/]+)/")
_FIELD_PREFIX = re.compile(
    r"^(Q|Question|Facts|Clause|Sentence|Text|Excerpt|Contract|Input)\s*:\s*", re.I
)


@dataclass(frozen=True)
class Example:
    """One labelled text; ``group`` names its source (e.g. ``legalbench/hearsay``, ``humaneval``)."""

    text: str
    label: str
    group: str
    view: str = "instruction"


def source_group(record: Record) -> str:
    """``legalbench/<task>`` for LegalBench records, else the upstream repository name."""
    m = _TASK.search(record.source)
    if m:
        return f"legalbench/{m.group(1)}"
    return record.source.split(":")[0].split("@")[0] or record.domain


def last_paragraph(text: str, min_chars: int = 20) -> str | None:
    """The last blank-line separated paragraph without a leading ``Q:`` / ``Clause:`` style field
    name, or None when the text has one paragraph or the last one is shorter than ``min_chars``."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    if len(paragraphs) < 2:
        return None
    last = _FIELD_PREFIX.sub("", paragraphs[-1])
    return last if len(last) >= min_chars else None


@dataclass(frozen=True)
class ViewPools:
    """Same-label material the generated views draw on: first sentences of answers (distractor
    options) and, for vignettes, the disease names of MedQuAD symptom records."""

    answers: tuple[str, ...] = ()
    diseases: tuple[str, ...] = ()

    @classmethod
    def of(cls, records: Sequence[Record]) -> ViewPools:
        answers = {a for r in records if (a := gen.first_sentence(r.response)) is not None}
        diseases = {
            sd[0] for r in records if (sd := gen.symptoms_disease(r.instruction, r.response))
        }
        return cls(tuple(sorted(answers)), tuple(sorted(diseases)))


def question_of(record: Record, max_chars: int = 600) -> str:
    """The record's question without its template: its last paragraph that asks (ends with "?"),
    else its last paragraph, else the instruction
    (cut to ``max_chars`` on a word, so a long contract excerpt does not drown the options)."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", record.instruction) if p.strip()]
    asks = [p for p in paragraphs if p.endswith("?")]
    q = asks[-1] if asks else (last_paragraph(record.instruction) or record.instruction.strip())
    q = _FIELD_PREFIX.sub("", q)
    return q if len(q) <= max_chars else q[:max_chars].rsplit(" ", 1)[0]


def record_views(
    record: Record,
    views: Sequence[str],
    min_response_chars: int,
    pools: ViewPools | None = None,
) -> list[tuple[str, str]]:
    """``(view, text)`` pairs of a record for the requested views (``VIEWS``); a generated view
    (``GENERATED_VIEWS``, see ``loralab.routing.views``) needs ``pools`` and is skipped where the
    record does not lend itself to it."""
    unknown = set(views) - set(VIEWS)
    if unknown:
        raise ValueError(f"unknown training view(s) {sorted(unknown)}; expected some of {VIEWS}")
    out = []
    if "instruction" in views:
        out.append(("instruction", record.instruction))
    if "last_paragraph" in views:
        last = last_paragraph(record.instruction)
        if last is not None:
            out.append(("last_paragraph", last))
    if "response" in views and len(record.response) >= min_response_chars:
        out.append(("response", record.response))
    if pools is None:
        return out
    if "multiple_choice" in views and (answer := gen.first_sentence(record.response)):
        mc = gen.multiple_choice(record.id, question_of(record), answer, pools.answers)
        if mc is not None:
            out.append(("multiple_choice", mc))
    if "vignette" in views and (sd := gen.symptoms_disease(record.instruction, record.response)):
        v = gen.vignette(record.id, sd[0], sd[1], pools.diseases)
        if v is not None:
            out.append(("vignette", v))
    if "response_sentence" in views and len(record.response) >= min_response_chars:
        sentences = gen.prose_sentences(record.response)
        if sentences:
            pick = sentences[gen.stable_int(record.id, "sentence") % len(sentences)]
            out.append(("response_sentence", pick))
    return out


def read_label_records(
    root: Path, files: Mapping[str, str], labels: Sequence[str] | None = None
) -> dict[str, list[Record]]:
    """Records of each router label (default: every domain of ``files``, then ``base``);
    ``files`` maps each domain and ``general`` (the ``base`` label) to a file name."""
    if labels is None:
        labels = router_labels([k for k in files if k != GENERAL])
    out = {}
    for label in labels:
        key = GENERAL if label == BASE_LABEL else label
        if key not in files:
            raise KeyError(f"data.files has no entry {key!r} (needed for router label {label!r})")
        out[label] = read_records(root / files[key], expected_domain=key)
    return out


def split_examples(
    records: Mapping[str, Sequence[Record]],
    split: str,
    val_fraction: float,
    test_fraction: float,
    max_per_label: int | Mapping[str, int | None] | None,
    views: Sequence[str] = ("instruction",),
    min_response_chars: int = 80,
    exclude_groups: Iterable[str] = (),
    max_generated_per_label: int | None = None,
) -> list[Example]:
    """Examples of one split: at most ``max_per_label`` records per label (one number, or a
    mapping label -> number; spread over each file, which is grouped by source), each expanded
    into its ``views``. Generated views are made for at most ``max_generated_per_label`` of
    those records (spread likewise), drawing distractors from the same label's chosen records."""
    excluded = set(exclude_groups)
    plain = [v for v in views if v not in GENERATED_VIEWS]
    generated = [v for v in views if v in GENERATED_VIEWS]
    out = []
    for label, recs in records.items():
        chosen = [
            r
            for r in recs
            if split_of(r.id, val_fraction, test_fraction) == split
            and source_group(r) not in excluded
        ]
        cap = max_per_label.get(label) if isinstance(max_per_label, Mapping) else max_per_label
        kept = spread_subset(chosen, cap)
        for r in kept:
            out += [
                Example(text, label, source_group(r), view)
                for view, text in record_views(r, plain, min_response_chars)
            ]
        if generated:
            pools = ViewPools.of(kept)
            for r in spread_subset(kept, max_generated_per_label):
                out += [
                    Example(text, label, source_group(r), view)
                    for view, text in record_views(r, generated, min_response_chars, pools)
                ]
    return out


def _eval_file(root: Path, name: str, domain: str) -> list[Record]:
    path = root / "eval" / name
    return read_records(path, expected_domain=domain) if path.is_file() else []


def out_of_style_examples(
    root: Path,
    records: Mapping[str, Sequence[Record]],
    heldout_groups: Iterable[str],
    max_per_group: int | None = 150,
) -> list[Example]:
    """Domain questions in styles the router never trains on (see the module docstring)."""
    heldout = set(heldout_groups)
    by_group: dict[tuple[str, str], list[str]] = {}
    for label, recs in records.items():
        for r in recs:
            group = source_group(r)
            if group in heldout:
                by_group.setdefault((label, group), []).append(
                    last_paragraph(r.instruction) or r.instruction
                )
    # The eval/ benchmarks: code and medical by nature; used only when that label is routed.
    code = "code" in records
    for r in _eval_file(root, "humaneval.jsonl", "code") if code else ():
        by_group.setdefault(("code", "humaneval"), []).append(r.instruction)
    for r in _eval_file(root, "mbpp_test_and_validation.jsonl", "code") if code else ():
        by_group.setdefault(("code", "mbpp_test"), []).append(r.instruction.split("\n")[0])
    for r in _eval_file(root, "conala_test.jsonl", "code") if code else ():
        intent = r.instruction.split(":", 1)[-1].strip()  # drop "Write a single line of ...:"
        by_group.setdefault(("code", "conala_test"), []).append(intent)
    pubmedqa = "medical" in records
    for r in _eval_file(root, "pubmedqa_pqal_test500.jsonl", "medical") if pubmedqa else ():
        m = re.search(r"Question:\s*(.+?)\s*$", r.instruction, re.S)
        by_group.setdefault(("medical", "pubmedqa_test_question"), []).append(
            m.group(1) if m else r.instruction
        )
    out = []
    for (label, group), texts in sorted(by_group.items()):
        out += [Example(t, label, group, "check") for t in _spread(texts, max_per_group)]
    return out


def _spread(items: Sequence[str], limit: int | None) -> list[str]:
    if limit is None or limit >= len(items):
        return list(items)
    step = len(items) / limit
    return [items[int(i * step)] for i in range(limit)]
