"""The end-of-run summaries of the results dict: the final metric list and the paired tests."""

from __future__ import annotations

import math

import pytest
from omegaconf import OmegaConf

from loralab.evaluation.results import final_metrics, paired_nll_tests


def _metric(system: str, set_name: str, metric: str, value: float) -> dict:
    return {"system": system, "set": set_name, "metric": metric, "value": value}


def test_final_metrics_add_gap_recovery_order_by_system_and_drop_nan_values() -> None:
    metrics = [
        _metric("router", "law", "nll", 1.5),
        _metric("router", "law", "rougeL", math.nan),  # not measured: dropped
        _metric("extra", "law", "nll", 1.8),  # not in the systems list: last
        _metric("oracle", "law", "nll", 1.0),
        _metric("base", "law", "nll", 2.0),
        _metric("base", "tie", "nll", 3.0),
        _metric("oracle", "tie", "nll", 3.0),  # no gap to recover: gap_recovery NaN, kept
    ]
    out = final_metrics(metrics, ["base", "oracle", "router"])
    assert len(metrics) == 7  # the input is left as it was
    assert [m["system"] for m in out] == ["base"] * 4 + ["oracle"] * 4 + ["router"] * 2 + [
        "extra"
    ] * 2
    gap = {(m["system"], m["set"]): m["value"] for m in out if m["metric"] == "gap_recovery"}
    assert gap["router", "law"] == pytest.approx(0.5)
    assert gap["extra", "law"] == pytest.approx(0.2)
    assert (gap["base", "law"], gap["oracle", "law"]) == (0.0, 1.0)
    assert math.isnan(gap["base", "tie"]) and math.isnan(gap["oracle", "tie"])
    assert not any(m["metric"] == "rougeL" for m in out)


def test_paired_nll_tests_cover_the_pairs_whose_systems_were_both_scored() -> None:
    scored = {"nll_sum": [2.0, 4.0, 3.0], "n_tokens": [2, 2, 2]}
    better = {"nll_sum": [1.0, 3.0, 2.0], "n_tokens": [2, 2, 2]}
    per_example = {"base": {"law": scored}, "router": {"law": better}}
    bootstrap = OmegaConf.create({"n": 200, "seed": 0, "alpha": 0.05})
    tests = paired_nll_tests(per_example, [("router", "base"), ("moelora", "base")], bootstrap)
    assert list(tests) == ["router_vs_base"]  # moelora was not run
    assert tests["router_vs_base"]["law"]["diff"] == pytest.approx(-0.5)
