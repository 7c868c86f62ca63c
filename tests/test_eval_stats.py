"""Bootstrap intervals, paired tests, gap recovery, ROUGE-L and Pareto fronts on known numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from loralab.evaluation.stats import (
    bootstrap_mean_ci,
    gap_recovery,
    gap_recovery_metrics,
    nll_metrics,
    paired_bootstrap,
    paired_tests,
    pareto_front,
    rouge_l,
)


def test_constant_data_gives_zero_width_interval() -> None:
    n_tokens = np.array([3, 10, 7, 1, 50])
    mean, low, high = bootstrap_mean_ci(2.5 * n_tokens, n_tokens)
    assert mean == pytest.approx(2.5)
    assert low == pytest.approx(2.5)
    assert high == pytest.approx(2.5)


def test_mean_is_token_weighted_not_example_weighted() -> None:
    # example 1: 1 token at NLL 10; example 2: 9 tokens at NLL 0 -> 10 / 10 tokens = 1.0
    assert bootstrap_mean_ci([10.0, 0.0], [1, 9], n_boot=50)[0] == pytest.approx(1.0)


def test_interval_covers_true_mean_of_a_normal_sample() -> None:
    rng = np.random.default_rng(1)
    per_token = rng.normal(2.0, 0.5, size=400)
    mean, low, high = bootstrap_mean_ci(per_token, np.ones(400), n_boot=2000)
    assert low < 2.0 < high
    assert low < mean < high
    # the percentile interval of a mean of 400 draws with sd 0.5 has width ~ 2 * 1.96 * 0.5 / 20
    assert high - low == pytest.approx(2 * 1.96 * 0.5 / 20, rel=0.2)


def test_interval_is_seeded_and_shrinks_with_alpha() -> None:
    rng = np.random.default_rng(2)
    sums, tokens = rng.gamma(2.0, 5.0, 100), rng.integers(5, 20, 100)
    assert bootstrap_mean_ci(sums, tokens, seed=3) == bootstrap_mean_ci(sums, tokens, seed=3)
    _, low95, high95 = bootstrap_mean_ci(sums, tokens, alpha=0.05)
    _, low50, high50 = bootstrap_mean_ci(sums, tokens, alpha=0.5)
    assert low95 < low50 < high50 < high95


def test_zero_token_examples_do_not_move_the_interval() -> None:
    rng = np.random.default_rng(4)
    sums, tokens = rng.normal(30.0, 5.0, 40), rng.integers(5, 15, 40)
    padded = bootstrap_mean_ci(np.append(sums, 0.0), np.append(tokens, 0))
    assert padded == bootstrap_mean_ci(sums, tokens)  # an example with no token is no observation


@pytest.mark.parametrize(
    ("sums", "tokens", "match"),
    [
        ([1.0, 2.0], [1], "2 examples but n_tokens has 1"),
        ([], [], "no examples"),
        ([1.0, float("nan")], [1, 1], "non-finite value at example 1"),
        ([1.0, 1.0], [1, -1], "negative count at example 1"),
        ([0.0, 0.0], [0, 0], "sums to zero"),
        ([[1.0]], [[1]], "must be 1-D"),
    ],
)
def test_bad_inputs_are_named(sums, tokens, match) -> None:
    with pytest.raises(ValueError, match=match):
        bootstrap_mean_ci(sums, tokens)


def test_bad_alpha_and_n_boot() -> None:
    with pytest.raises(ValueError, match="alpha"):
        bootstrap_mean_ci([1.0], [1], alpha=1.5)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_mean_ci([1.0], [1], n_boot=0)


def test_paired_test_finds_a_clear_difference() -> None:
    rng = np.random.default_rng(5)
    tokens = rng.integers(10, 100, 200)
    difficulty = rng.normal(2.0, 0.8, 200)  # shared per example: pairing removes it
    a = (difficulty + 0.05 + rng.normal(0, 0.02, 200)) * tokens
    b = difficulty * tokens
    out = paired_bootstrap(a, b, tokens)
    assert out["diff"] == pytest.approx((a.sum() - b.sum()) / tokens.sum())
    assert out["diff"] == pytest.approx(0.05, abs=0.01)
    assert 0 < out["low"] < out["diff"] < out["high"]
    assert out["p_value"] < 0.01
    assert out["p_value"] == pytest.approx(2 / 1001)


def test_paired_test_finds_nothing_on_identical_inputs() -> None:
    rng = np.random.default_rng(6)
    tokens = rng.integers(10, 100, 50)
    a = rng.normal(2.0, 0.5, 50) * tokens
    out = paired_bootstrap(a, a.copy(), tokens)
    assert out == {"diff": 0.0, "low": 0.0, "high": 0.0, "p_value": 1.0}


def test_paired_test_is_antisymmetric_and_not_significant_on_noise() -> None:
    rng = np.random.default_rng(7)
    tokens = np.full(300, 20)
    a, b = rng.normal(40, 5, 300), rng.normal(40, 5, 300)
    ab, ba = paired_bootstrap(a, b, tokens), paired_bootstrap(b, a, tokens)
    assert ab["diff"] == pytest.approx(-ba["diff"])
    assert ab["low"] == pytest.approx(-ba["high"])
    assert ab["p_value"] == pytest.approx(ba["p_value"])
    assert ab["low"] < 0 < ab["high"]
    assert ab["p_value"] > 0.05


def test_paired_p_value_is_the_exact_sign_flip_test_on_few_examples() -> None:
    # 5 examples, a worse than b on each by a different amount: of the 2**5 = 32 ways to swap a and
    # b within examples, only "no swap" and "swap all" reach |diff| >= the observed one: p = 2/32
    tokens = np.array([10, 20, 10, 30, 10])
    b = np.array([10.0, 30.0, 12.0, 40.0, 9.0])
    a = b + np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert paired_bootstrap(a, b, tokens, n_boot=1000)["p_value"] == pytest.approx(2 / 32)


def test_gap_recovery_known_numbers() -> None:
    assert gap_recovery(base=2.0, system=1.5, oracle=1.0) == pytest.approx(0.5)
    assert gap_recovery(2.0, 1.0, 1.0) == pytest.approx(1.0)
    assert gap_recovery(2.0, 2.0, 1.0) == pytest.approx(0.0)
    assert gap_recovery(2.0, 2.5, 1.0) == pytest.approx(-0.5)  # worse than base
    assert gap_recovery(2.0, 0.8, 1.0) == pytest.approx(1.2)  # better than the oracle
    assert math.isnan(gap_recovery(2.0, 1.5, 2.0))


def test_nll_and_gap_recovery_metric_entries() -> None:
    tokens = [10, 10]
    metrics = [
        *nll_metrics("base", "law", [20.0, 20.0], tokens, n_boot=20),
        *nll_metrics("oracle", "law", [10.0, 10.0], tokens, n_boot=20),
        *nll_metrics("router", "law", [12.0, 12.0], tokens, n_boot=20),
        *nll_metrics("router", "general", [12.0, 12.0], tokens, n_boot=20),  # no base/oracle there
    ]
    nll, ppl = metrics[4], metrics[5]
    assert nll == {
        "system": "router",
        "set": "law",
        "metric": "nll",
        "value": pytest.approx(1.2),
        "ci_low": pytest.approx(1.2),
        "ci_high": pytest.approx(1.2),
    }
    assert ppl["metric"] == "ppl"
    assert ppl["value"] == pytest.approx(math.exp(1.2))
    gaps = {(g["system"], g["set"]): g["value"] for g in gap_recovery_metrics(metrics)}
    assert gaps == {
        ("base", "law"): 0.0,
        ("oracle", "law"): 1.0,
        ("router", "law"): pytest.approx(0.8),
    }


def test_paired_tests_over_sets_and_mismatched_examples() -> None:
    per_example = {
        "router": {"law": {"nll_sum": [5.0, 6.0], "n_tokens": [5, 6]}, "cost": {}},
        "moelora": {"law": {"nll_sum": [4.0, 5.0], "n_tokens": [5, 6]}},
    }
    out = paired_tests(per_example, "router", "moelora", n_boot=50)
    assert set(out) == {"law"}
    assert out["law"]["diff"] == pytest.approx(2.0 / 11)
    per_example["moelora"]["law"]["n_tokens"] = [6, 5]
    with pytest.raises(ValueError, match="different n_tokens"):
        paired_tests(per_example, "router", "moelora")
    with pytest.raises(KeyError, match="xlora"):
        paired_tests(per_example, "router", "xlora")


@pytest.mark.parametrize(
    ("pred", "ref", "expected"),
    [
        ("the cat sat on the mat", "the cat sat on the mat", 1.0),
        ("", "the cat", 0.0),
        ("dog", "the cat", 0.0),
        # LCS "the cat the" = 3; P = 3/4, R = 3/5 -> F = 2PR/(P+R) = 2/3
        ("the cat the mat", "the big cat on the", 2 * 0.75 * 0.6 / (0.75 + 0.6)),
        ("a b c d", "d c b a", 2 * 0.25 * 0.25 / 0.5),  # order matters: LCS = 1
        # rouge-score's tokenizer: lowercase, punctuation separates; Porter stemming: cats -> cat
        ("The Cats sat.", "the cat sat", 1.0),
        ("Yes, the contract terminates.", "yes", 2 * (1 / 4) * 1 / (1 / 4 + 1)),
    ],
)
def test_rouge_l(pred: str, ref: str, expected: float) -> None:
    assert rouge_l(pred, ref) == pytest.approx(expected)
    assert rouge_l(ref, pred) == pytest.approx(expected)  # F-measure is symmetric


def test_pareto_front() -> None:
    loss = [1.0, 1.2, 0.9, 1.3, 1.0, float("nan")]
    speed = [100.0, 150.0, 50.0, 120.0, 90.0, 500.0]
    # 3 is beaten by 1 (lower loss, more speed); 4 by 0; the nan point is never on the front
    assert pareto_front(loss, speed).tolist() == [True, True, True, False, False, False]
    assert pareto_front([1.0, 1.0], [5.0, 5.0]).tolist() == [True, True]  # ties both stay
    with pytest.raises(ValueError, match="equal length"):
        pareto_front([1.0], [1.0, 2.0])
