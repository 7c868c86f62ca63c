"""Plots of an evaluation ``results`` dict (schema: ``loralab.evaluation.report``).

Each ``plot_*`` function takes the results dict and returns a matplotlib ``Figure``, or ``None`` when
the data it needs is absent, so the report, W&B logging and ``notebooks/compare.ipynb`` draw the
same pictures. Here: reading the metrics, the head-to-head plots (quality, accuracy, gap recovery,
quality vs speed) and ``PLOTS``, every plot of the report; the router and gate plots are in
``routing_plots.py``, figure making and saving in ``figures.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from loralab.evaluation.figures import new_figure, save_plot
from loralab.evaluation.routing_plots import (
    plot_gate_heatmaps,
    plot_gate_usage,
    plot_router_confusion,
)
from loralab.evaluation.stats import pareto_front

BASE, ORACLE = "base", "oracle"
REFERENCE_SYSTEMS = (BASE, ORACLE)  # gap recovery is 0 and 1 for them by definition
MetricKey = tuple[str, str, str]  # (system, set, metric)


# ----------------------------------------------------------------------------- results access


def metric_table(results: Mapping[str, Any]) -> dict[MetricKey, dict[str, Any]]:
    """``{(system, set, metric): entry}``; a later duplicate entry wins."""
    return {(m["system"], m["set"], m["metric"]): m for m in results["metrics"]}


def metric_value(table: Mapping[MetricKey, Mapping[str, Any]], key: MetricKey) -> float:
    """The entry's value as a float; nan when the entry is absent or its value is null."""
    entry = table.get(key)
    v = None if entry is None else entry["value"]
    return math.nan if v is None else float(v)


def sets_with(results: Mapping[str, Any], metric: str) -> list[str]:
    """Sets that have ``metric`` for some system, in ``results['sets']`` order then first seen."""
    seen = [m["set"] for m in results["metrics"] if m["metric"] == metric]
    ordered = [s for s in results["sets"] if s in seen]
    return ordered + [s for s in dict.fromkeys(seen) if s not in ordered]


def systems_of(results: Mapping[str, Any]) -> list[str]:
    """``results['systems']`` then any other system that has a metric."""
    listed = list(results["systems"])
    return listed + [
        s for s in dict.fromkeys(m["system"] for m in results["metrics"]) if s not in listed
    ]


def domains_of(results: Mapping[str, Any]) -> list[str]:
    """The experts' domains of the run (``results['domains']``, else its ``data.domains``)."""
    if "domains" in results:
        return list(results["domains"])
    return list(results.get("config", {}).get("data", {}).get("domains", []))


def mean_domain_nll(results: Mapping[str, Any]) -> dict[str, float]:
    """Per system, its mean ``nll`` over the domain sets (``domains_of``); only systems with all."""
    table = metric_table(results)
    domain_sets = [s for s in domains_of(results) if s in sets_with(results, "nll")]
    out = {}
    for system in systems_of(results):
        values = [metric_value(table, (system, s, "nll")) for s in domain_sets]
        if domain_sets and all(math.isfinite(v) for v in values):
            out[system] = float(np.mean(values))
    return out


# ------------------------------------------------------------------------- head-to-head plots


def _grouped_bars(
    ax: Any,
    groups: Sequence[str],
    series: Sequence[str],
    values: np.ndarray,
    errors: np.ndarray | None = None,
) -> None:
    """Bars ``values[series, group]`` side by side in each group, optional ``errors[2, series, group]``."""
    n_series = len(series)
    width = 0.8 / n_series
    x = np.arange(len(groups))
    palette = colormaps["tab20"] if n_series > 10 else colormaps["tab10"]
    for i, name in enumerate(series):
        yerr = None if errors is None else errors[:, i, :]
        ax.bar(
            x - 0.4 + width * (i + 0.5),
            values[i],
            width,
            yerr=yerr,
            label=name,
            capsize=2,
            color=palette(i % palette.N),
        )
    ax.set_xticks(x, groups)
    ax.legend(
        fontsize="small",
        ncols=2 if n_series > 6 else 1,
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
    )


def _bars_with_ci(
    results: Mapping[str, Any], columns: Sequence[tuple[str, str]], ylabel: str, title: str
) -> tuple[Figure, Any, np.ndarray] | None:
    """One group of bars per (set, metric) column, one bar per system, CI error bars."""
    if not columns:
        return None
    table = metric_table(results)
    systems = [s for s in systems_of(results) if any((s, *c) in table for c in columns)]
    values = np.array([[metric_value(table, (s, *c)) for c in columns] for s in systems])
    errors = np.zeros((2, len(systems), len(columns)))
    for i, s in enumerate(systems):
        for j, c in enumerate(columns):
            entry = table.get((s, *c), {})
            if entry.get("ci_low") is not None and entry.get("ci_high") is not None:
                errors[0, i, j] = values[i, j] - entry["ci_low"]
                errors[1, i, j] = entry["ci_high"] - values[i, j]
    fig = new_figure(max(7.0, 1.4 * len(columns) + 0.25 * len(systems)), 4.5)
    ax = fig.add_subplot()
    _grouped_bars(ax, [t for t, _ in columns], systems, values, errors)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return fig, ax, values


def plot_nll(results: Mapping[str, Any]) -> Figure | None:
    """Mean token NLL per system on each set, with the bootstrap CI as error bars."""
    drawn = _bars_with_ci(
        results,
        [(t, "nll") for t in sets_with(results, "nll")],
        "mean token NLL (nats), 95% CI",
        "Quality per evaluation set (lower is better)",
    )
    if drawn is None:
        return None
    fig, ax, values = drawn
    finite = values[np.isfinite(values)]
    if finite.size:
        ax.set_ylim(max(0.0, 0.9 * finite.min() - 0.1), None)
    return fig


def plot_accuracy(results: Mapping[str, Any]) -> Figure | None:
    """Multiple-choice accuracy and code pass rate per system on each set, with bootstrap CIs."""
    columns = [(t, m) for m in ("accuracy", "pass_rate") for t in sets_with(results, m)]
    drawn = _bars_with_ci(
        results, columns, "accuracy / pass rate, 95% CI", "Task accuracy (higher is better)"
    )
    if drawn is None:
        return None
    drawn[1].set_ylim(0.0, 1.0)
    return drawn[0]


def plot_gap_recovery(results: Mapping[str, Any]) -> Figure | None:
    """Oracle-gap recovery per system (one bar per set); base = 0 and oracle = 1 drawn as lines."""
    table = metric_table(results)
    sets = [
        t
        for t in sets_with(results, "gap_recovery")
        if any(
            math.isfinite(metric_value(table, (s, t, "gap_recovery"))) for s in systems_of(results)
        )
    ]
    systems = [
        s
        for s in systems_of(results)
        if s not in REFERENCE_SYSTEMS and any((s, t, "gap_recovery") in table for t in sets)
    ]
    if not sets or not systems:
        return None
    values = np.array(
        [[metric_value(table, (s, t, "gap_recovery")) for s in systems] for t in sets]
    )
    fig = new_figure(min(14.0, 0.8 * len(systems) + 3), 4.5)
    ax = fig.add_subplot()
    _grouped_bars(ax, systems, sets, values)
    ax.axhline(0.0, color="black", lw=0.8)
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.tick_params(axis="x", labelrotation=30)
    ax.set_ylabel("(base − system) / (base − oracle)")
    ax.set_title("Oracle-gap recovery (higher is better; 0 = base, dashed 1 = oracle)")
    return fig


def plot_pareto(results: Mapping[str, Any]) -> Figure | None:
    """Mean NLL over the domain sets vs decode tokens/s, with the Pareto front of the deployable
    systems marked (the oracle needs the gold domain, so it is drawn as a reference only)."""
    nll = mean_domain_nll(results)
    table = metric_table(results)
    points = [(s, nll[s], metric_value(table, (s, "cost", "decode_tokens_per_s"))) for s in nll]
    points = [p for p in points if math.isfinite(p[2])]
    if not points:
        return None
    names = [p[0] for p in points]
    loss = np.array([p[1] for p in points])
    speed = np.array([p[2] for p in points])
    reference = np.array([n == ORACLE for n in names])
    front = np.zeros(len(names), dtype=bool)
    front[~reference] = pareto_front(loss[~reference], speed[~reference])
    fig = new_figure(7.0, 4.8)
    ax = fig.add_subplot()
    dominated = ~front & ~reference
    ax.scatter(speed[dominated], loss[dominated], color="grey", label="dominated")
    ax.scatter(speed[front], loss[front], color="C3", zorder=3, label="Pareto front")
    ax.scatter(
        speed[reference], loss[reference], color="black", marker="x", label="oracle (gold domain)"
    )
    order = np.argsort(speed[front])
    ax.plot(speed[front][order], loss[front][order], color="C3", lw=1, zorder=2)
    for name, x, y in zip(names, speed, loss, strict=True):
        ax.annotate(name, (x, y), xytext=(4, 4), textcoords="offset points", fontsize="small")
    ax.set_xlabel("decode tokens/s (higher is better)")
    ax.set_ylabel(f"mean NLL over {', '.join(domains_of(results))} (lower is better)")
    ax.set_title("Quality vs decode speed")
    ax.legend(fontsize="small")
    return fig


PlotFn = Callable[[Mapping[str, Any]], Figure | None]
PLOTS: dict[str, tuple[str, PlotFn, str]] = {
    # file stem: (title, function, what is missing when it returns None)
    "nll_by_set": ("NLL per system per set", plot_nll, "no `nll` metrics"),
    "accuracy": ("Task accuracy per system per set", plot_accuracy, "no `accuracy` metrics"),
    "gap_recovery": (
        "Oracle-gap recovery",
        plot_gap_recovery,
        "no finite `gap_recovery` metrics for non-reference systems",
    ),
    "pareto": (
        "Quality vs decode speed",
        plot_pareto,
        "no system with domain-set `nll` and `cost/decode_tokens_per_s`",
    ),
    "router_confusion": (
        "Router confusion matrix",
        plot_router_confusion,
        "no `routing.router.confusion`",
    ),
    "gate_usage": (
        "MoE-LoRA gate usage per domain",
        plot_gate_usage,
        "no `routing.moelora.gate_usage`",
    ),
    "gate_heatmaps": (
        "MoE-LoRA per-token gate heatmaps",
        plot_gate_heatmaps,
        "no `routing.moelora.heatmaps`",
    ),
}


def write_plots(
    results: Mapping[str, Any], plot_dir: str | Path
) -> tuple[dict[str, Path], dict[str, str]]:
    """Draw every plot into ``plot_dir``; return ({stem: png path}, {stem: why it was skipped})."""
    written, skipped = {}, {}
    for stem, (_title, draw, missing) in PLOTS.items():
        fig = draw(results)
        if fig is None:
            skipped[stem] = missing
            continue
        path = Path(plot_dir) / f"{stem}.png"
        written[stem] = save_plot(fig, path)
    return written, skipped
