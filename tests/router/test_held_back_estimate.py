"""The held-back estimate: check strata re-weighted by the reference design's held-back confusion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests_router_helpers import exam_checks_script

from loralab.routing.exam_check import exam_items
from loralab.routing.held_back import (
    MIN_STRATUM,
    NotEnoughChecks,
    Outcome,
    estimate_held_back,
    load_reference,
    stratum_weights,
)


def _outcomes(gold: str, ref: str, right: int, wrong: int) -> list[Outcome]:
    return [Outcome(gold, ref, True)] * right + [Outcome(gold, ref, False)] * wrong


def test_strata_weighted_by_hand() -> None:
    confusion = {"a": {"a": 8, "b": 2}, "b": {"b": 10}}
    outcomes = _outcomes("a", "a", 3, 1) + _outcomes("a", "b", 1, 3) + _outcomes("b", "b", 5, 0)
    est = estimate_held_back(outcomes, confusion, min_n=3, n_resamples=200)
    assert est["per_label"] == {"a": pytest.approx((8 * 0.75 + 2 * 0.25) / 10), "b": 1.0}
    assert est["estimate"] == pytest.approx((6.5 + 10) / 20)
    assert est["bounds"] == [pytest.approx(0.825), pytest.approx(0.825)]  # no stratum borrowed
    assert est["checks_accuracy"] == pytest.approx(9 / 13)  # unweighted: the checks' own mix
    low, high = est["interval_95"]
    assert low < est["estimate"] < high


def test_thin_and_missing_strata_borrow_and_bound() -> None:
    confusion = {"a": {"a": 6, "b": 2, "c": 2}, "c": {"c": 5, "a": 5}}
    outcomes = (
        _outcomes("a", "a", 4, 0)
        + _outcomes("a", "b", 1, 0)  # one question: under min_n, borrows a's mistakes
        + _outcomes("a", "c", 1, 2)
        + _outcomes("c", "c", 3, 0)  # c -> a is not on the checks: borrows every mistake
    )
    est = estimate_held_back(outcomes, confusion, min_n=3, n_resamples=100)
    a_mistakes, all_mistakes = 2 / 4, 2 / 4
    assert est["per_label"]["a"] == pytest.approx((6 + 2 * a_mistakes + 2 * (1 / 3)) / 10)
    assert est["per_label"]["c"] == pytest.approx((5 + 5 * all_mistakes) / 10)
    a = est["per_label"]["a"]
    assert est["bounds"] == [pytest.approx((a * 10 + 5) / 20), pytest.approx((a * 10 + 10) / 20)]
    sources = {(s["gold"], s["reference"]): s["from"] for s in est["strata"]}
    assert sources == {
        ("a", "a"): "stratum",
        ("a", "b"): "a mistakes",
        ("a", "c"): "stratum",
        ("c", "c"): "stratum",
        ("c", "a"): "all mistakes",
    }


def test_a_stratum_stands_for_itself_only_from_min_stratum_questions() -> None:
    """Three questions (one right) standing for 26 held-back ones swung the estimate by points."""
    confusion = {"a": {"a": 74, "b": 26}}
    mistakes = _outcomes("a", "c", 40, 10)  # the label's other mistakes, 40 right
    for n, expected_b in ((MIN_STRATUM - 1, 40 / (50 + MIN_STRATUM - 1)), (MIN_STRATUM, 0.0)):
        outcomes = _outcomes("a", "a", 20, 0) + _outcomes("a", "b", 0, n) + mistakes
        est = estimate_held_back(outcomes, confusion, n_resamples=20)
        b = next(s for s in est["strata"] if s["reference"] == "b")
        assert b["accuracy"] == pytest.approx(expected_b)
        assert b["from"] == ("a mistakes" if n < MIN_STRATUM else "stratum")


def test_stratum_weights_give_each_stratum_its_held_back_share() -> None:
    confusion = {"a": {"a": 8, "b": 2}, "b": {"b": 10}}
    # checks: a -> a 12, a -> b 10, b -> b 10, b -> a 2 (too few to stand), a -> c 5 (none held back)
    cells = [("a", "a", 12), ("a", "b", 10), ("b", "b", 10), ("b", "a", 2), ("a", "c", 5)]
    gold = [g for g, _, n in cells for _ in range(n)]
    ref = [r for _, r, n in cells for _ in range(n)]
    w = stratum_weights(gold, ref, confusion, min_n=3)
    assert w.mean() == pytest.approx(1.0)
    pairs = list(zip(gold, ref, strict=True))
    by_cell = {(g, r): w[pairs.index((g, r))] for g, r, _ in cells}
    neutral = 20 / 39  # held back / checks
    scale = by_cell["b", "b"] / (10 / 10)
    assert by_cell["a", "a"] == pytest.approx(scale * 8 / 12)
    assert by_cell["a", "b"] == pytest.approx(scale * 2 / 10)
    assert by_cell["b", "a"] == by_cell["a", "c"] == pytest.approx(scale * neutral)
    # weighted, the checks' strata hold the held-back shares
    held = {cell: sum(x for x, p in zip(w, pairs, strict=True) if p == cell) for cell in by_cell}
    assert held["a", "a"] / held["b", "b"] == pytest.approx(8 / 10)
    with pytest.raises(ValueError, match="2 gold labels for 1 reference decisions"):
        stratum_weights(["a", "a"], ["a"], confusion)


def test_a_baseline_is_estimated_on_the_same_resamples() -> None:
    confusion = {"a": {"a": 8, "b": 2}, "b": {"b": 10}}
    outcomes = _outcomes("a", "a", 3, 1) + _outcomes("a", "b", 1, 3) + _outcomes("b", "b", 5, 0)
    # the baseline misses one more a -> a question and gets every a -> b question wrong
    baseline = [False, False, True, False] + [False] * 4 + [True] * 5
    est = estimate_held_back(outcomes, confusion, min_n=3, n_resamples=300, baseline=baseline)
    assert est["baseline"]["per_label"] == {"a": pytest.approx(8 * 0.25 / 10), "b": 1.0}
    lead = est["lead"]
    assert lead["estimate"] == pytest.approx(est["estimate"] - (2 + 10) / 20)
    # paired: the candidate is never behind on a resample, so the lead's interval stays above 0
    assert 0 < lead["interval_95"][0] <= lead["estimate"] <= lead["interval_95"][1]
    same = estimate_held_back(
        outcomes, confusion, min_n=3, n_resamples=50, baseline=[o.correct for o in outcomes]
    )
    assert same["lead"] == {"estimate": 0.0, "interval_95": [0.0, 0.0]}
    with pytest.raises(ValueError, match="min_n must be at least 1, got 0"):
        estimate_held_back(outcomes, confusion, min_n=0)
    with pytest.raises(ValueError, match="2 baseline outcomes for 13 questions"):
        estimate_held_back(outcomes, confusion, min_n=3, baseline=[True, False])


def test_a_label_the_checks_do_not_hold_is_refused() -> None:
    with pytest.raises(NotEnoughChecks, match="stratum b -> b"):
        estimate_held_back(_outcomes("a", "a", 5, 0), {"a": {"a": 1}, "b": {"b": 1}}, min_n=3)


def test_the_reference_design_gets_back_its_held_back_figure() -> None:
    """Its own decisions, put through the estimate, give what issue 13 measured: 77.3 %."""
    ref = load_reference()
    outcomes = [
        Outcome(i.label, ref.decisions[c][i.id], ref.decisions[c][i.id] == i.label)
        for c in ref.decisions
        for i in exam_items(check=c)
    ]
    est = estimate_held_back(outcomes, ref.confusion, n_resamples=50)
    assert est["per_label"] == pytest.approx(
        {"law": 0.87, "code": 0.75, "medical": 0.67, "base": 0.80}
    )
    assert est["estimate"] == pytest.approx(0.7725)
    assert est["checks_accuracy"] < 0.76  # the checks alone read it lower


def test_the_reference_answers_every_question_of_its_checks() -> None:
    ref = load_reference()
    assert set(ref.decisions) == {f"exam{k}" for k in range(2, 20)}
    for check, decided in ref.decisions.items():
        assert set(decided) == {i.id for i in exam_items(check=check)}
        assert set(decided.values()) <= {"law", "code", "medical", "base"}
    assert {g: sum(row.values()) for g, row in ref.confusion.items()} == dict.fromkeys(
        ("law", "code", "medical", "base"), 200
    )


def test_estimate_command_line(tmp_path: Path) -> None:
    items = exam_items("dev", "exam3")
    perfect = tmp_path / "exam3.jsonl"
    perfect.write_text("".join(json.dumps({"id": i.id, "label": i.label}) + "\n" for i in items))
    done = exam_checks_script("estimate", f"exam3={perfect}", "--half", "dev")
    assert done.returncode == 0, done.stderr
    est = json.loads(done.stdout)
    assert (est["estimate"], est["checks_n"], est["half"]) == (1.0, len(items), "dev")
    assert est["min_stratum"] == MIN_STRATUM
    # the reference sent no exam3 law question to base, 26 of the 800 held back: all wrong at worst
    assert est["bounds"] == [pytest.approx(1 - 26 / 800), 1.0]

    for pair in (f"exam={perfect}", str(perfect)):  # a check the reference never answered; no name
        bad = exam_checks_script("estimate", pair)
        assert bad.returncode == 2
        assert f"{pair!r}: expected CHECK=DECISIONS_FILE" in bad.stderr and "exam5" in bad.stderr
    short = exam_checks_script("estimate", f"exam4={perfect}", "--half", "dev")
    assert short.returncode == 2
    assert "is not a question of the check" in short.stderr

    wrong = tmp_path / "wrong.jsonl"  # every decision base: right on the base questions only
    wrong.write_text("".join(json.dumps({"id": i.id, "label": "base"}) + "\n" for i in items))
    done = exam_checks_script(
        "estimate", f"exam3={perfect}", "--baseline", f"exam3={wrong}", "--half", "dev"
    )
    assert done.returncode == 0, done.stderr
    est = json.loads(done.stdout)
    assert est["baseline"]["per_label"]["base"] == 1.0
    assert est["baseline"]["checks_accuracy"] == 0.25
    assert est["lead"]["estimate"] == pytest.approx(1.0 - est["baseline"]["estimate"])
    other = exam_checks_script(
        "estimate", f"exam3={perfect}", "--baseline", f"exam4={wrong}", "--half", "dev"
    )
    assert other.returncode == 2
    assert "compare them on the same checks" in other.stderr
    # the stratum size reaches the estimate: too large a one leaves a stratum nothing to stand on
    big = exam_checks_script(
        "estimate", f"exam3={perfect}", "--half", "dev", "--min-stratum", "1000"
    )
    assert big.returncode == 2 and "(need 1000)" in big.stderr
    zero = exam_checks_script("estimate", f"exam3={perfect}", "--min-stratum", "0")
    assert zero.returncode == 2 and "must be at least 1, got 0" in zero.stderr
