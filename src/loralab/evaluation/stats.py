"""Statistics for the head-to-head evaluation: bootstrap intervals, paired tests, gap recovery, ROUGE-L.

Every NLL statistic here is a *token-weighted* mean (total NLL / total response tokens) and every
resampling draws *examples* (a response's tokens stay together), so long responses weigh by their
length exactly as in the point estimate. Intervals come from ``scipy.stats.bootstrap``
(percentile), paired p-values from ``scipy.stats.permutation_test``, ROUGE-L from ``rouge-score``;
all are seeded, so the same inputs give the same numbers.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats


def _as_examples(nll_sum: ArrayLike, n_tokens: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(nll_sum, dtype=np.float64)
    n = np.asarray(n_tokens, dtype=np.float64)
    if s.ndim != 1 or n.ndim != 1:
        raise ValueError(f"nll_sum and n_tokens must be 1-D, got shapes {s.shape} and {n.shape}")
    if s.shape != n.shape:
        raise ValueError(f"nll_sum has {s.size} examples but n_tokens has {n.size}")
    if s.size == 0:
        raise ValueError("no examples to score")
    if not np.all(np.isfinite(s)):
        raise ValueError(
            f"nll_sum has a non-finite value at example {int(np.argmin(np.isfinite(s)))}"
        )
    if np.any(n < 0):
        raise ValueError(f"n_tokens has a negative count at example {int(np.argmax(n < 0))}")
    if n.sum() == 0:
        raise ValueError("n_tokens sums to zero: no target tokens to score")
    return s, n


def _token_weighted_mean(values: np.ndarray, n_tokens: np.ndarray, axis: int = -1) -> np.ndarray:
    """sum(values) / sum(tokens) along ``axis``: the statistic every resample computes."""
    return values.sum(axis=axis) / n_tokens.sum(axis=axis)


def _scored(values: np.ndarray, n_tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop examples with no scored token: they carry no observation (and would let a resample
    hold no token at all)."""
    keep = n_tokens > 0
    return values[keep], n_tokens[keep]


def _percentile_interval(
    values: np.ndarray, n_tokens: np.ndarray, n_boot: int, seed: int, alpha: float
) -> tuple[float, float]:
    """``scipy.stats.bootstrap`` percentile interval of the token-weighted mean, resampling
    examples (``paired=True``: an example's value and token count move together)."""
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    values, n_tokens = _scored(values, n_tokens)
    if values.size == 1 or np.all(values / n_tokens == values[0] / n_tokens[0]):
        point = float(values.sum() / n_tokens.sum())  # no spread: scipy warns and returns nan
        return point, point
    result = stats.bootstrap(
        (values, n_tokens),
        _token_weighted_mean,
        n_resamples=n_boot,
        paired=True,
        vectorized=True,
        confidence_level=1 - alpha,
        method="percentile",
        random_state=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def bootstrap_mean_ci(
    nll_sum: ArrayLike,
    n_tokens: ArrayLike,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float, float]:
    """Token-weighted mean NLL and its percentile bootstrap (1 - alpha) interval.

    Args:
        nll_sum: [N] summed NLL of each example's response tokens.
        n_tokens: [N] number of scored tokens of each example.
    Returns:
        (mean, low, high).
    """
    _check_alpha(alpha)
    s, n = _as_examples(nll_sum, n_tokens)
    low, high = _percentile_interval(s, n, n_boot, seed, alpha)
    return float(s.sum() / n.sum()), low, high


def paired_bootstrap(
    a_sum: ArrayLike,
    b_sum: ArrayLike,
    n_tokens: ArrayLike,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, float]:
    """Paired comparison of token-weighted mean NLLs, ``a - b``, on the same examples.

    Interval: ``scipy.stats.bootstrap`` percentile interval of the difference, resampling examples
    (the same examples for both systems). p-value: two-sided paired permutation test
    (``scipy.stats.permutation_test``, ``permutation_type="samples"``: a and b are swapped within
    each example at random) of the same difference; exact when 2**N <= ``n_boot``, else from
    ``n_boot`` random swaps with the +1 correction (smallest p with 1000: 2/1001).

    Args:
        a_sum, b_sum: [N] summed NLL per example of systems a and b.
        n_tokens: [N] scored tokens per example (shared).
    Returns:
        {"diff", "low", "high", "p_value"}; diff < 0 means a has the lower (better) NLL.
    """
    _check_alpha(alpha)
    a, n = _as_examples(a_sum, n_tokens)
    b, _ = _as_examples(b_sum, n_tokens)
    keep = n > 0
    a, b, n = a[keep], b[keep], n[keep]
    total = n.sum()
    low, high = _percentile_interval(a - b, n, n_boot, seed, alpha)
    if a.size < 2:
        p_value = math.nan  # one example: no permutation distribution, no test
    elif np.array_equal(a, b):
        p_value = 1.0  # every swap gives the same difference
    else:
        p_value = stats.permutation_test(
            (a, b),
            lambda x, y, axis=-1: (x.sum(axis=axis) - y.sum(axis=axis)) / total,
            permutation_type="samples",
            vectorized=True,
            n_resamples=n_boot,
            alternative="two-sided",
            random_state=np.random.default_rng(seed),
        ).pvalue
    return {
        "diff": float((a.sum() - b.sum()) / total),
        "low": low,
        "high": high,
        "p_value": float(p_value),
    }


def gap_recovery(base: float, system: float, oracle: float) -> float:
    """Share of the base-to-oracle NLL gap a system closes: (base - system) / (base - oracle).

    1 = as good as the oracle, 0 = no better than the base model, < 0 = worse than base; nan when
    the oracle does not differ from the base (no gap to recover).
    """
    gap = base - oracle
    if gap == 0 or not math.isfinite(gap):
        return math.nan
    return (base - system) / gap


def perplexity(mean_nll: float) -> float:
    """exp(mean token NLL); inf instead of an overflow error for absurd NLLs."""
    return math.exp(mean_nll) if mean_nll < 700 else math.inf


@functools.cache
def _rouge_l_scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F-measure (``rouge-score``, Google's reimplementation of ROUGE-1.5.5): longest common
    subsequence of tokens, with its default tokenizer (lowercase, non-alphanumeric characters as
    separators) and the Porter stemmer (ROUGE-1.5.5's ``-m``). 0.0 when either text has no token."""
    return float(_rouge_l_scorer().score(ref, pred)["rougeL"].fmeasure)


def pareto_front(loss: ArrayLike, speed: ArrayLike) -> np.ndarray:
    """Bool mask of points no other point beats: lower-or-equal loss AND higher-or-equal speed,
    strictly better in one. Non-finite points are never on the front."""
    x = np.asarray(loss, dtype=np.float64)
    y = np.asarray(speed, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"loss and speed must be 1-D of equal length, got {x.shape} and {y.shape}")
    finite = np.isfinite(x) & np.isfinite(y)
    no_worse = (x[None, :] <= x[:, None]) & (y[None, :] >= y[:, None])  # [i, j]: j no worse than i
    better = (x[None, :] < x[:, None]) | (y[None, :] > y[:, None])
    dominated = (no_worse & better & finite[None, :]).any(axis=1)
    return finite & ~dominated


def nll_metrics(
    system: str,
    set_name: str,
    nll_sum: ArrayLike,
    n_tokens: ArrayLike,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> list[dict[str, Any]]:
    """The ``nll`` and ``ppl`` metric entries (results schema) of one system on one set."""
    mean, low, high = bootstrap_mean_ci(nll_sum, n_tokens, n_boot=n_boot, seed=seed, alpha=alpha)
    entry = {"system": system, "set": set_name}
    return [
        {**entry, "metric": "nll", "value": mean, "ci_low": low, "ci_high": high},
        {
            **entry,
            "metric": "ppl",
            "value": perplexity(mean),
            "ci_low": perplexity(low),
            "ci_high": perplexity(high),
        },
    ]


def gap_recovery_metrics(
    metrics: Sequence[Mapping[str, Any]], base: str = "base", oracle: str = "oracle"
) -> list[dict[str, Any]]:
    """``gap_recovery`` entries for every system and set that have an ``nll`` for base and oracle."""
    nll = {(m["system"], m["set"]): m["value"] for m in metrics if m["metric"] == "nll"}
    out = []
    for (system, set_name), value in nll.items():
        if (base, set_name) in nll and (oracle, set_name) in nll:
            g = gap_recovery(nll[base, set_name], value, nll[oracle, set_name])
            out.append(
                {
                    "system": system,
                    "set": set_name,
                    "metric": "gap_recovery",
                    "value": g,
                    "ci_low": None,
                    "ci_high": None,
                }
            )
    return out


def paired_tests(
    per_example: Mapping[str, Mapping[str, Mapping[str, ArrayLike]]],
    a: str,
    b: str,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, dict[str, float]]:
    """``paired_bootstrap(a - b)`` on every set both systems were scored on (results schema)."""
    for name in (a, b):
        if name not in per_example:
            raise KeyError(f"per_example has no system {name!r} (has {sorted(per_example)})")
    out = {}
    for set_name, ex_a in per_example[a].items():
        ex_b = per_example[b].get(set_name)
        if ex_b is None:
            continue
        if not np.array_equal(ex_a["n_tokens"], ex_b["n_tokens"]):
            raise ValueError(
                f"per_example[{a!r}][{set_name!r}] and per_example[{b!r}][{set_name!r}] have "
                "different n_tokens: not the same examples in the same order"
            )
        out[set_name] = paired_bootstrap(
            ex_a["nll_sum"],
            ex_b["nll_sum"],
            ex_a["n_tokens"],
            n_boot=n_boot,
            seed=seed,
            alpha=alpha,
        )
    return out
