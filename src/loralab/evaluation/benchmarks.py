"""Held-out benchmark questions from config: multiple choice by option likelihood, extra NLL sets,
HumanEval problems.

``eval.choice_sets`` lists the built-in multiple-choice benchmarks, each of a ``kind``:

- ``first_word``: records whose gold response starts with one of ``choices`` (PubMedQA:
  ``Yes. ...`` / ``No. ...`` / ``Maybe. ...``); the options are ``choices``.
- ``label_set``: the records of ``domain``'s file whose source group is in ``groups`` (LegalBench
  tasks the router never trains on); each group's options are its distinct gold responses.
  Records in the training samples named by ``exclude_train_caps`` are left out.

``eval.extra_sets`` brings any benchmark without code: a JSONL of
``{"id", "domain", "question", "choices", "answer"}`` (multiple choice; ``answer`` is one of the
choices or its index) or of ``{"id", "domain", "instruction", "response"}`` (NLL). Bad lines stop
with ``<file>:<line>: field '<name>' ...``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loralab.data.records import (
    DataFormatError,
    Record,
    data_root,
    json_objects,
    read_records,
    spread_subset,
)

log = logging.getLogger(__name__)

CHOICE_FIELDS = ("id", "domain", "question", "choices", "answer")
KINDS = ("choice", "nll")


@dataclass(frozen=True)
class ChoiceQuestion:
    """A question, its options and the index of the right one. ``group`` names its task."""

    id: str
    domain: str
    prompt: str
    choices: tuple[str, ...]
    answer: int
    group: str = ""

    def __post_init__(self) -> None:
        if len(self.choices) < 2 or len(set(self.choices)) != len(self.choices):
            raise ValueError(
                f"question {self.id!r}: needs >= 2 distinct choices, got {self.choices}"
            )
        if not 0 <= self.answer < len(self.choices):
            raise ValueError(f"question {self.id!r}: answer {self.answer} is not a choice index")


def _resolve(data_cfg: Mapping[str, Any], path: str | Path) -> Path:
    """``path`` as given when absolute or existing, else under the data root."""
    p = Path(path)
    return p if p.is_absolute() or p.exists() else data_root(data_cfg) / p


def first_word_questions(
    path: Path, domain: str, choices: Sequence[str], name: str
) -> list[ChoiceQuestion]:
    """Records whose response starts with one of ``choices`` (then ``.``, ``,`` or a space)."""
    if not all(isinstance(c, str) for c in choices):
        raise ValueError(
            f"eval.choice_sets {name}: 'choices' must be strings, got {list(choices)} "
            "(quote Yes / No in YAML)"
        )
    out = []
    for r in read_records(path, expected_domain=domain):
        word = r.response.split(maxsplit=1)[0].rstrip(".,;:")
        if word not in choices:
            raise DataFormatError(
                f"{path}: record {r.id!r}: field 'response' starts with {word!r}, not one of "
                f"{list(choices)} ({name})"
            )
        out.append(ChoiceQuestion(r.id, domain, r.instruction, tuple(choices), choices.index(word)))
    return out


def label_set_questions(
    records: Sequence[Record], groups: Sequence[str], excluded: set[str]
) -> list[ChoiceQuestion]:
    """Records of ``groups`` (not in ``excluded``), options = their group's distinct responses."""
    from loralab.routing.datasets import source_group

    by_group: dict[str, list[Record]] = {g: [] for g in groups}
    for r in records:
        group = source_group(r)
        if group in by_group:
            by_group[group].append(r)
    missing = [g for g, rs in by_group.items() if not rs]
    if missing:
        raise ValueError(f"label_set: no records for group(s) {missing}")
    out = []
    for group, rs in by_group.items():
        labels = tuple(sorted({r.response.strip() for r in rs}))  # every record's, kept or not
        if len(labels) < 2:
            raise ValueError(f"label_set: group {group!r} has one label only {labels}")
        out += [
            ChoiceQuestion(
                r.id, r.domain, r.instruction, labels, labels.index(r.response.strip()), group
            )
            for r in rs
            if r.id not in excluded
        ]
    return out


def read_choice_file(path: Path) -> list[ChoiceQuestion]:
    """A JSONL of ``{"id", "domain", "question", "choices", "answer"}`` (see the module doc)."""
    if not path.is_file():
        raise FileNotFoundError(f"extra set file not found: {path}")
    out: list[ChoiceQuestion] = []
    seen: dict[str, int] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, obj in json_objects(f, path):
            where = f"{path}:{lineno}"
            for field in CHOICE_FIELDS:
                if field not in obj:
                    raise DataFormatError(f"{where}: field '{field}' is missing")
            for field in ("id", "domain", "question"):
                if not isinstance(obj[field], str) or not obj[field].strip():
                    raise DataFormatError(
                        f"{where}: field '{field}' must be a non-empty string, got {obj[field]!r:.60}"
                    )
            choices = obj["choices"]
            if (
                not isinstance(choices, list)
                or len(choices) < 2
                or not all(isinstance(c, str) and c.strip() for c in choices)
                or len(set(choices)) != len(choices)
            ):
                raise DataFormatError(
                    f"{where}: field 'choices' must be a list of >= 2 distinct non-empty strings, "
                    f"got {choices!r:.80}"
                )
            answer = obj["answer"]
            if isinstance(answer, str) and answer in choices:
                index = choices.index(answer)
            elif (
                isinstance(answer, int)
                and not isinstance(answer, bool)
                and 0 <= answer < len(choices)
            ):
                index = answer
            else:
                raise DataFormatError(
                    f"{where}: field 'answer' must be one of the choices or an index in "
                    f"[0, {len(choices)}), got {answer!r:.60}"
                )
            if obj["id"] in seen:
                raise DataFormatError(
                    f"{where}: field 'id' {obj['id']!r} repeats line {seen[obj['id']]}"
                )
            seen[obj["id"]] = lineno
            out.append(
                ChoiceQuestion(obj["id"], obj["domain"], obj["question"], tuple(choices), index)
            )
    if not out:
        raise DataFormatError(f"{path}: no records")
    return out


def file_kind(path: Path) -> str:
    """``choice`` when the first record has ``choices``, else ``nll``."""
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataFormatError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                return "choice" if isinstance(obj, dict) and "choices" in obj else "nll"
    raise DataFormatError(f"{path}: no records")


ChoiceSpec = tuple[list[ChoiceQuestion], bool]  # questions, whether each option ends with eos


def extra_sets(
    data_cfg: Mapping[str, Any], specs: Sequence[Mapping[str, Any]], taken: Sequence[str]
) -> tuple[dict[str, ChoiceSpec], dict[str, list[Record]]]:
    """``eval.extra_sets`` -> (multiple-choice sets, NLL sets), by name; names must be new."""
    choice: dict[str, ChoiceSpec] = {}
    nll: dict[str, list[Record]] = {}
    names = list(taken)
    for i, spec in enumerate(specs):
        for field in ("name", "path"):
            if not spec.get(field):
                raise ValueError(f"eval.extra_sets[{i}]: field '{field}' is missing")
        name = str(spec["name"])
        if name in names:
            raise ValueError(f"eval.extra_sets[{i}]: name {name!r} is already a set ({names})")
        names.append(name)
        path = _resolve(data_cfg, str(spec["path"]))
        if not path.is_file():
            raise FileNotFoundError(f"eval.extra_sets[{i}] ({name}): file not found: {path}")
        kind = str(spec.get("kind") or file_kind(path))
        if kind not in KINDS:
            raise ValueError(
                f"eval.extra_sets[{i}]: field 'kind' must be one of {KINDS}, got {kind!r}"
            )
        if kind == "choice":
            choice[name] = (read_choice_file(path), bool(spec.get("eos", False)))
        else:
            nll[name] = [  # ids prefixed: the router's decisions are keyed by record id
                Record(f"{name}/{r.id}", r.domain, r.instruction, r.response, r.source, r.license)
                for r in read_records(path)
            ]
    return choice, nll


def trained_ids(data_cfg: Mapping[str, Any], domain: str, caps: Sequence[Any]) -> set[str]:
    """Ids in the train-split samples a stage trains on, one per cap (``null``: the whole train
    split; ``0``: none)."""
    from loralab.data.records import load_domain_split

    out: set[str] = set()
    for cap in caps:
        if cap is None or int(cap) > 0:
            limit = None if cap is None else int(cap)
            out |= {r.id for r in load_domain_split(data_cfg, domain, "train", limit=limit)}
    return out


def router_heldout_groups(router_dir: str | Path | None) -> list[str] | None:
    """The held-out groups the router in ``router_dir`` was trained without (None if unknown)."""
    if router_dir is None or not Path(router_dir).is_dir():
        return None
    from router.persistence import read_router_config

    extra = read_router_config(router_dir).get("extra") or {}
    groups = ((extra.get("config") or {}).get("data") or {}).get("heldout_groups")
    return None if groups is None else [str(g) for g in groups]


def choice_sets(
    data_cfg: Mapping[str, Any],
    eval_cfg: Mapping[str, Any],
    router_groups: Sequence[str] | None = None,
) -> dict[str, ChoiceSpec]:
    """The built-in multiple-choice benchmarks (``eval.choice_sets.sets``) and the extra ones,
    each cut to ``eval.choice_sets.max_per_set`` questions spread over the set."""
    from loralab.data.records import domain_file

    cfg = eval_cfg["choice_sets"]
    out: dict[str, ChoiceSpec] = {}
    for spec in cfg.get("sets") or ():
        name, kind = str(spec["name"]), str(spec["kind"])
        if kind == "first_word":
            path = _resolve(data_cfg, str(spec["path"]))
            questions = first_word_questions(path, str(spec["domain"]), list(spec["choices"]), name)
        elif kind == "label_set":
            groups = spec.get("groups") or router_groups
            if not groups:
                raise ValueError(
                    f"eval.choice_sets {name}: no 'groups' (set them, or evaluate with a router "
                    "whose config names router.data.heldout_groups)"
                )
            domain = str(spec["domain"])
            excluded = trained_ids(data_cfg, domain, list(cfg.get("exclude_train_caps") or ()))
            records = read_records(domain_file(data_cfg, domain), expected_domain=domain)
            questions = label_set_questions(records, [str(g) for g in groups], excluded)
        else:
            raise ValueError(f"eval.choice_sets {name}: unknown kind {kind!r}")
        out[name] = (questions, bool(spec.get("eos", False)))
    extra, _ = extra_sets(data_cfg, eval_cfg.get("extra_sets") or (), [*eval_cfg["sets"], *out])
    out.update(extra)
    cap = cfg.get("max_per_set")
    return {n: (_spread(q, None if cap is None else int(cap)), e) for n, (q, e) in out.items()}


def _spread(questions: list[ChoiceQuestion], limit: int | None) -> list[ChoiceQuestion]:
    if limit is None or limit >= len(questions):
        return questions
    step = len(questions) / limit
    return [questions[int(i * step)] for i in range(limit)]


def humaneval_records(data_cfg: Mapping[str, Any], path: str, n: int) -> list[dict[str, Any]]:
    """``n`` HumanEval problems spread over the file: ``record`` (a ``Record``), ``test`` (the
    ``check(candidate)`` source) and ``entry_point``; bad lines stop with ``file:line: field``."""
    file = _resolve(data_cfg, path)
    records = {r.id: r for r in read_records(file)}
    out = []
    with file.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            obj = json.loads(line)
            for field in ("test", "entry_point"):
                if not isinstance(obj.get(field), str) or not obj[field].strip():
                    raise DataFormatError(
                        f"{file}:{lineno}: field '{field}' must be a non-empty string"
                    )
            if not obj["entry_point"].isidentifier():
                raise DataFormatError(
                    f"{file}:{lineno}: field 'entry_point' {obj['entry_point']!r} is not an identifier"
                )
            out.append(
                {
                    "record": records[obj["id"]],
                    "test": obj["test"],
                    "entry_point": obj["entry_point"],
                }
            )
    picked = spread_subset([o["record"] for o in out], n)
    ids = {r.id for r in picked}
    return [o for o in out if o["record"].id in ids]
