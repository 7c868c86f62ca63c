"""Plots of how the systems route: the router's confusion matrix and the MoE-LoRA gate's usage
per domain set and per token (from an evaluation ``results`` dict, like ``plots.py``), and the gate
training's usage per layer."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from loralab.evaluation.figures import new_figure


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


def routed_router(results: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The run's router summary (``routing.router``), or None when it routed no single-domain
    request (no router, or an all-zero confusion: a run without single-domain sets)."""
    router = (results.get("routing") or {}).get("router")
    if not router or not np.asarray(router.get("confusion", [])).any():
        return None
    return router


def plot_router_confusion(results: Mapping[str, Any]) -> Figure | None:
    """The router's confusion matrix: counts, colored by share of each true class."""
    router = routed_router(results)
    if router is None:
        return None
    counts = np.asarray(router["confusion"], dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    labels = router["labels"]
    fig = new_figure(1.2 * len(labels) + 2.5, 1.1 * len(labels) + 1.5)
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
    fig = new_figure(1.1 * len(sets) + 2.5, 0.9 * len(experts) + 1.8)
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
    fig = new_figure(min(18.0, max(7.0, 0.16 * longest + 2)), 2.3 * len(examples))
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


def plot_gate_usage_by_layer(usage: Mapping[str, Any]) -> Figure:
    """Gate training's validation usage: one panel per domain, mean gate weight per wrapped layer
    (rows, model order) and slot (columns); ``usage`` is ``GateTrainingModule.last_usage``."""
    domains, slots = usage["domains"], usage["slots"]
    fig = new_figure(2.2 * len(domains) + 1, 6)
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
