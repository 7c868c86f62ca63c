"""A check's questions as ``python -m router route`` requests, and the decisions scored back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tests_router_helpers import exam_checks_script

from loralab.routing.exam_check import (
    DecisionsFileError,
    exam_items,
    request_lines,
    score_decisions,
)
from router import Router


def _decision(item_id: str, label: str, reason: str = "confident") -> str:
    return json.dumps({"id": item_id, "label": label, "reason": reason})


def test_requests_carry_the_id_and_the_text_only() -> None:
    items = exam_items("dev", "exam")
    rows = [json.loads(line) for line in request_lines(items)]
    assert len(rows) == len(items) == 118
    assert all(set(r) == {"id", "text"} for r in rows)
    assert [r["id"] for r in rows] == [i.id for i in items]
    assert rows[0]["text"] == items[0].text


def test_scores_count_by_hand() -> None:
    items = exam_items(check="exam")  # law 61, code 59, medical 59, base 61; both halves
    law = [i for i in items if i.label == "law"]
    code = [i for i in items if i.label == "code"]
    wrong = {law[0].id: ("base", "low_confidence"), law[1].id: ("medical", "confident")}
    wrong[code[0].id] = ("law", "confident")
    lines = [_decision(i.id, *wrong.get(i.id, (i.label, "confident"))) for i in items]
    lines.insert(5, "")  # blank lines are skipped
    s = score_decisions(items, lines[::-1], "d.jsonl")  # order does not matter
    assert (s["n"], s["correct"]) == (240, 237)
    assert s["accuracy"] == pytest.approx(237 / 240)
    assert s["recall"] == {
        "law": pytest.approx(59 / 61),
        "code": pytest.approx(58 / 59),
        "medical": 1.0,
        "base": 1.0,
    }
    assert s["mistakes"] == {"law -> base": 1, "law -> medical": 1, "code -> law": 1}
    assert s["mistakes_by_reason"] == {"confident": 2, "low_confidence": 1}
    dev_wrong = sum(i.half == "dev" for i in items if i.id in wrong)
    assert s["halves"]["dev"]["correct"] == 118 - dev_wrong
    assert s["halves"]["sealed"]["n"] == 122


def test_one_half_is_scored_alone() -> None:
    items = exam_items("sealed", "exam2")
    s = score_decisions(items, [_decision(i.id, "base") for i in items], "d.jsonl")
    assert set(s["halves"]) == {"sealed"}
    assert s["correct"] == sum(i.label == "base" for i in items) == 60


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda ls: [*ls[:1], "not json", *ls[1:]], r"d\.jsonl:2: not valid JSON"),
        (lambda ls: [*ls, json.dumps({"id": "law-001"})], r"d\.jsonl:119: .*'id' and 'label'"),
        (lambda ls: [*ls, _decision("nope-1", "law")], r"d\.jsonl:119: id 'nope-1' is not a"),
        (lambda ls: ls + ls[:1], r"d\.jsonl:119: id '.+' decided twice"),
        (lambda ls: ls[2:], r"d\.jsonl: 2 of 118 questions have no decision \(first: "),
    ],
)
def test_a_decisions_file_that_does_not_answer_the_check_is_refused(edit, message) -> None:
    items = exam_items("dev", "exam")
    lines = [_decision(i.id, i.label) for i in items]
    with pytest.raises(DecisionsFileError, match=message):
        score_decisions(items, edit(lines), "d.jsonl")


def test_requests_route_and_score_through_the_command_lines(
    toy_router: Router, tmp_path: Path
) -> None:
    toy_router.save(tmp_path / "r")
    requests = exam_checks_script("requests", "exam", "--half", "dev")
    assert requests.returncode == 0, requests.stderr
    routed = subprocess.run(
        [sys.executable, "-m", "router", "route", "--model", str(tmp_path / "r")],
        input=requests.stdout,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    (tmp_path / "decisions.jsonl").write_text(routed.stdout)
    scored = exam_checks_script("score", "exam", str(tmp_path / "decisions.jsonl"), "--half", "dev")
    assert scored.returncode == 0, scored.stderr
    summary = json.loads(scored.stdout)
    gold = {i.id: i.label for i in exam_items("dev", "exam")}
    decided = [json.loads(line) for line in routed.stdout.splitlines()]
    assert summary["check"] == "exam" and summary["n"] == len(decided) == 118
    assert summary["correct"] == sum(d["label"] == gold[d["id"]] for d in decided)

    # the other half's decisions do not answer this half: a clear error, exit status 2
    wrong_half = exam_checks_script(
        "score", "exam", str(tmp_path / "decisions.jsonl"), "--half", "sealed"
    )
    assert wrong_half.returncode == 2
    assert "is not a question of the check" in wrong_half.stderr
    missing = exam_checks_script("score", "exam", str(tmp_path / "none.jsonl"))
    assert missing.returncode == 2 and "none.jsonl" in missing.stderr
