"""Plots of an evaluation ``results`` dict (schema: ``loralab.evaluation.report``).

Each ``plot_*`` function takes the results dict and returns a matplotlib ``Figure``, or ``None`` when
the data it needs is absent, so the report, W&B logging and ``notebooks/compare.ipynb`` draw the
same pictures. Figures are built without pyplot (Agg canvas), so nothing here touches global
backend state and a figure is freed once it goes out of scope.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from loralab.evaluation.stats import pareto_front
from loralab.io_utils import atomic_write_bytes

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


# ----------------------------------------------------------------------------- plots


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


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
    fig = _new_figure(max(7.0, 1.4 * len(columns) + 0.25 * len(systems)), 4.5)
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
    fig = _new_figure(min(14.0, 0.8 * len(systems) + 3), 4.5)
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
    fig = _new_figure(7.0, 4.8)
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


def _annotated_heatmap(
    ax: Any,
    data: np.ndarray,
    rows: Sequence[str],
    cols: Sequence[str],
    labels: np.ndarray,
    cmap: str = "viridis",
    vmax: float | None = None,
) -> Any:
    """``data[rows, cols]`` as colors from 0 to ``vmax`` (default: its max), ``labels`` written on top."""
    top = max(1e-9, float(np.nanmax(data))) if vmax is None else vmax
    image = ax.imshow(data, cmap=cmap, vmin=0.0, vmax=top)
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), rows)
    rgb = image.cmap(image.norm(np.nan_to_num(data)))[..., :3]
    light = rgb @ np.array([0.299, 0.587, 0.114]) > 0.5  # text dark on light cells, light on dark
    for i in range(len(rows)):
        for j in range(len(cols)):
            color = "black" if light[i, j] else "white"
            ax.text(j, i, labels[i, j], ha="center", va="center", color=color, fontsize="small")
    return image


def plot_router_confusion(results: Mapping[str, Any]) -> Figure | None:
    """The router's confusion matrix: counts, colored by share of each true class."""
    router = (results.get("routing") or {}).get("router")
    if not router or "confusion" not in router:
        return None
    counts = np.asarray(router["confusion"], dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    labels = router["labels"]
    fig = _new_figure(1.2 * len(labels) + 2.5, 1.1 * len(labels) + 1.5)
    ax = fig.add_subplot()
    image = _annotated_heatmap(ax, share, labels, labels, counts.astype(int), "Blues", vmax=1.0)
    fig.colorbar(image, ax=ax, label="share of true class")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    accuracy = router.get("accuracy")
    ax.set_title(
        "Router confusion" + (f" (accuracy {accuracy:.3f})" if accuracy is not None else "")
    )
    return fig


def plot_gate_usage(results: Mapping[str, Any]) -> Figure | None:
    """MoE-LoRA mean gate weight per expert (rows) on each domain set (columns)."""
    moe = (results.get("routing") or {}).get("moelora")
    if not moe or not moe.get("gate_usage"):
        return None
    usage = moe["gate_usage"]
    sets = list(usage)
    experts = list(moe.get("experts") or dict.fromkeys(e for u in usage.values() for e in u))
    data = np.array([[float(usage[s].get(e, math.nan)) for s in sets] for e in experts])
    fig = _new_figure(1.1 * len(sets) + 2.5, 0.9 * len(experts) + 1.8)
    ax = fig.add_subplot()
    text = np.vectorize(lambda v: f"{v:.2f}")(data)
    image = _annotated_heatmap(ax, data, experts, sets, text)
    fig.colorbar(image, ax=ax, label="mean gate weight")
    ax.set_xlabel("evaluation set")
    ax.set_ylabel("expert")
    ax.set_title("MoE-LoRA gate usage")
    return fig


def plot_gate_heatmaps(results: Mapping[str, Any], max_examples: int = 3) -> Figure | None:
    """Per-token gate weights (experts x tokens) of a few two-domain examples."""
    moe = (results.get("routing") or {}).get("moelora") or {}
    examples = list(moe.get("heatmaps") or [])[:max_examples]
    if not examples:
        return None
    experts = list(moe.get("experts") or [])
    longest = max(len(ex["tokens"]) for ex in examples)
    fig = _new_figure(min(18.0, max(7.0, 0.16 * longest + 2)), 2.3 * len(examples))
    axes = fig.subplots(len(examples), 1, squeeze=False)[:, 0]
    image: Any = None
    for ax, ex in zip(axes, examples, strict=True):
        weights = np.asarray(ex["weights"], dtype=np.float64)  # [tokens, experts]
        image = ax.imshow(
            weights.T, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest"
        )
        n_experts = weights.shape[1]
        rows = experts if len(experts) == n_experts else [str(i) for i in range(n_experts)]
        ax.set_yticks(range(len(rows)), rows)
        step = max(1, math.ceil(len(ex["tokens"]) / 80))
        ax.set_xticks(
            range(0, len(ex["tokens"]), step), ex["tokens"][::step], rotation=90, fontsize=6
        )
        ax.set_title(" + ".join(ex.get("domains") or []), fontsize="small")
    fig.colorbar(image, ax=list(axes), label="gate weight (mean over layers)")
    fig.suptitle("MoE-LoRA per-token gate weights on two-domain requests")
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


def _save_figure(fig: Figure, path: Path) -> None:
    """Write a PNG atomically (temp file in the same folder + rename)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write_bytes(path, buf.getvalue())


def plot_gate_usage_by_layer(usage: Mapping[str, Any]) -> Figure:
    """Gate training's validation usage: one panel per domain, mean gate weight per wrapped layer
    (rows, model order) and slot (columns); ``usage`` is ``GateTrainingModule.last_usage``."""
    domains, slots = usage["domains"], usage["slots"]
    fig = _new_figure(2.2 * len(domains) + 1, 6)
    axes = fig.subplots(1, len(domains), squeeze=False)[0]
    images = []
    for ax, domain, grid in zip(axes, domains, usage["per_layer"], strict=True):  # grid [L, S]
        image = ax.imshow(
            grid, aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest"
        )
        ax.set_title(f"{domain} tokens")
        ax.set_xticks(range(len(slots)), slots, rotation=45)
        images.append(image)
    axes[0].set_ylabel("wrapped layer (model order)")
    fig.colorbar(images[0], ax=axes.tolist(), label="mean gate weight")
    return fig


def save_plot(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (atomically) and return the path."""
    _save_figure(fig, Path(path))
    return Path(path)


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
        _save_figure(fig, path)
        written[stem] = path
    return written, skipped
