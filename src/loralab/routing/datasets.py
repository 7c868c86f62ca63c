"""Labelled texts for the router: train / val / test splits and an out-of-style check set.

Labels: ``law``, ``code``, ``medical`` from their domain files, ``base`` from ``general.jsonl``.
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

from loralab.data.records import Record, read_records, split_of, spread_subset

LABEL_FILE_KEYS = {"law": "law", "code": "code", "medical": "medical", "base": "general"}
VIEWS = ("instruction", "last_paragraph", "response")
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


def record_views(
    record: Record, views: Sequence[str], min_response_chars: int
) -> list[tuple[str, str]]:
    """``(view, text)`` pairs of a record for the requested views (``VIEWS``)."""
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
    return out


def read_label_records(root: Path, files: Mapping[str, str]) -> dict[str, list[Record]]:
    """Records of each router label; ``files`` maps ``law/code/medical/general`` to file names."""
    out = {}
    for label, key in LABEL_FILE_KEYS.items():
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
) -> list[Example]:
    """Examples of one split: at most ``max_per_label`` records per label (one number, or a
    mapping label -> number; spread over each file, which is grouped by source), each expanded
    into its ``views``."""
    excluded = set(exclude_groups)
    out = []
    for label, recs in records.items():
        chosen = [
            r
            for r in recs
            if split_of(r.id, val_fraction, test_fraction) == split
            and source_group(r) not in excluded
        ]
        cap = max_per_label.get(label) if isinstance(max_per_label, Mapping) else max_per_label
        for r in spread_subset(chosen, cap):
            group = source_group(r)
            out += [
                Example(text, label, group, view)
                for view, text in record_views(r, views, min_response_chars)
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
    for r in _eval_file(root, "humaneval.jsonl", "code"):
        by_group.setdefault(("code", "humaneval"), []).append(r.instruction)
    for r in _eval_file(root, "mbpp_test_and_validation.jsonl", "code"):
        by_group.setdefault(("code", "mbpp_test"), []).append(r.instruction.split("\n")[0])
    for r in _eval_file(root, "conala_test.jsonl", "code"):
        intent = r.instruction.split(":", 1)[
            -1
        ].strip()  # drop "Write a single line of Python code to:"
        by_group.setdefault(("code", "conala_test"), []).append(intent)
    for r in _eval_file(root, "pubmedqa_pqal_test500.jsonl", "medical"):
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
