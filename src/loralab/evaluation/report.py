"""Write an evaluation ``results`` dict out: results.json, results.csv, report.md and PNG plots.

The results dict (filled by the evaluation harness) has fixed keys::

    experiment, created, git_commit, versions, device, config,
    systems: [str], sets: [str],
    metrics: [{system, set, metric, value, ci_low, ci_high}],   # one per system x set x metric
    per_example: {system: {set: {nll_sum: [float], n_tokens: [int]}}},
    paired_tests: {"<a>_vs_<b>": {set: {diff, low, high, p_value}}},
    choice_sets: {set: {n_questions, n_options, ids, groups, answers}},
    per_question: {system: {set: {pred, pred_norm, correct, correct_norm}}},
    paired_tests_accuracy: {"<a>_vs_<b>": {set: {diff, low, high, p_value}}},  # 0/1 outcomes
    routing: {router: {labels, accuracy, confusion, per_set_accuracy},
              moelora: {experts, gate_usage: {set: {expert: w}}, heatmaps: [...]}}

Everything but ``systems``, ``sets`` and ``metrics`` is optional; what is missing is skipped and
the report says so.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loralab.evaluation.plots import (
    PLOTS,
    REFERENCE_SYSTEMS,
    MetricKey,
    metric_table,
    sets_with,
    systems_of,
    write_plots,
)
from loralab.evaluation.routing_plots import routed_router
from loralab.io_utils import atomic_write_json, atomic_write_text

CSV_COLUMNS = ("system", "set", "metric", "value", "ci_low", "ci_high")
GENERATION_METRICS = ("rougeL", "pass_rate")
ACCURACY_METRICS = ("accuracy", "accuracy_norm")
COST_METRICS = (
    "prefill_tokens_per_s",
    "decode_tokens_per_s",
    "ttft_ms",
    "peak_memory_mb",
    "weights_mb",
)


def validate_results(results: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the first missing or malformed field the outputs rely on."""
    if not isinstance(results, Mapping):
        raise ValueError(f"results must be a dict, got {type(results).__name__}")
    for key in ("systems", "sets", "metrics"):
        if key not in results:
            raise ValueError(f"results has no {key!r} key (has {sorted(results)})")
    for i, m in enumerate(results["metrics"]):
        if not isinstance(m, Mapping):
            raise ValueError(f"results['metrics'][{i}] is a {type(m).__name__}, not a dict")
        for field in CSV_COLUMNS:
            if field not in m:
                raise ValueError(f"results['metrics'][{i}] has no {field!r} field: {dict(m)}")
    router = (results.get("routing") or {}).get("router")
    if router and "confusion" in router:
        n = len(router["labels"])
        shape = np.shape(router["confusion"])
        if shape != (n, n):
            raise ValueError(
                f"results['routing']['router']['confusion'] has shape {shape}, "
                f"expected ({n}, {n}) for labels {router['labels']}"
            )
    moe = (results.get("routing") or {}).get("moelora") or {}
    for i, ex in enumerate(moe.get("heatmaps") or []):
        shape = np.shape(ex["weights"])
        if len(shape) != 2 or shape[0] != len(ex["tokens"]):
            raise ValueError(
                f"results['routing']['moelora']['heatmaps'][{i}]['weights'] has shape {shape}, "
                f"expected ({len(ex['tokens'])}, n_experts) for its {len(ex['tokens'])} tokens"
            )


def json_safe(obj: Any) -> Any:
    """A copy with numpy scalars/arrays as Python values and nan/inf as None (strict JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | np.ndarray):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_results(results: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """Write ``results.json`` (strict JSON, nan -> null) and ``results.csv`` (one row per metric)."""
    validate_results(results)
    out = Path(out_dir)
    safe = json_safe(results)
    json_path, csv_path = out / "results.json", out / "results.csv"
    atomic_write_json(json_path, safe)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for m in safe["metrics"]:
        writer.writerow(["" if m[c] is None else m[c] for c in CSV_COLUMNS])
    atomic_write_text(csv_path, buf.getvalue())
    return [json_path, csv_path]


# ----------------------------------------------------------------------------- markdown


def _fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, bool | str):
        return str(v)
    if v is None or not math.isfinite(v):
        return "–"
    return f"{float(v):.{digits}f}"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


def _cell(entry: Mapping[str, Any] | None, digits: int = 3) -> str:
    if entry is None:
        return ""
    text = _fmt(entry["value"], digits)
    if entry.get("ci_low") is not None and entry.get("ci_high") is not None:
        text += f" [{_fmt(entry['ci_low'], digits)}, {_fmt(entry['ci_high'], digits)}]"
    return text


def _pivot(
    table: Mapping[MetricKey, Mapping[str, Any]],
    systems: Sequence[str],
    columns: Sequence[tuple[str, str]],
    digits: int = 3,
) -> list[list[str]]:
    """Rows ``[system, cell per (set, metric) column]``; systems without any cell are left out."""
    rows = []
    for s in systems:
        cells = [_cell(table.get((s, t, m)), digits) for t, m in columns]
        if any(cells):
            rows.append([s, *cells])
    return rows


def _quality_section(results: Mapping[str, Any], table: Mapping[MetricKey, Any]) -> list[str]:
    systems = systems_of(results)
    lines: list[str] = []
    nll_sets = sets_with(results, "nll")
    if nll_sets:
        lines += ["## Quality: mean token NLL (nats, 95 % bootstrap CI)", ""]
        lines += _md_table(
            ["system", *nll_sets], _pivot(table, systems, [(t, "nll") for t in nll_sets])
        )
    gap_sets = sets_with(results, "gap_recovery")
    if gap_sets:
        lines += [
            "## Oracle-gap recovery",
            "",
            "(base − system) / (base − oracle): 1 = as good as the gold-domain expert, "
            "0 = no better than the base model; – where the oracle equals the base.",
            "",
        ]
        others = [s for s in systems if s not in REFERENCE_SYSTEMS]
        lines += _md_table(
            ["system", *gap_sets], _pivot(table, others, [(t, "gap_recovery") for t in gap_sets])
        )
    for name, sets in (results.get("paired_tests") or {}).items():
        a, _, b = name.partition("_vs_")
        lines += _paired_table(
            f"Paired bootstrap: {a} − {b} (mean NLL difference)",
            f"Same examples for both; diff < 0 means {a} has the lower NLL; p is two-sided.",
            sets,
        )
    return lines


def _paired_table(title: str, reading: str, sets: Mapping[str, Any]) -> list[str]:
    """One paired test's section: per set the difference, its interval and p-value (none when
    the run has no set of that kind)."""
    if not sets:
        return []
    rows = [
        [t, _fmt(d["diff"]), f"[{_fmt(d['low'])}, {_fmt(d['high'])}]", _fmt(d["p_value"], 4)]
        for t, d in sets.items()
    ]
    return [f"## {title}", "", reading, "", *_md_table(["set", "diff", "95 % CI", "p"], rows)]


def _accuracy_section(results: Mapping[str, Any], table: Mapping[MetricKey, Any]) -> list[str]:
    """Multiple-choice accuracy (option likelihood) and the paired tests on 0/1 outcomes."""
    columns = [(t, m) for t in sets_with(results, "accuracy") for m in ACCURACY_METRICS]
    lines: list[str] = []
    if columns:
        counts = {k: v.get("n_questions") for k, v in (results.get("choice_sets") or {}).items()}
        lines += [
            "## Task accuracy: multiple choice by option likelihood (95 % bootstrap CI)",
            "",
            "Each option scored as the reply to the question; `accuracy` picks the lowest summed "
            "NLL, `accuracy_norm` the lowest NLL per option token. Questions: "
            + ", ".join(f"{t} {n}" for t, n in counts.items()),
            "",
        ]
        lines += _md_table(
            ["system", *(f"{t} {m}" for t, m in columns)],
            _pivot(table, systems_of(results), columns),
        )
    for name, sets in (results.get("paired_tests_accuracy") or {}).items():
        a, _, b = name.partition("_vs_")
        lines += _paired_table(
            f"Paired test: {a} − {b} (accuracy / pass-rate difference)",
            f"Same questions for both; diff > 0 means {a} is right more often; p is two-sided.",
            sets,
        )
    return lines


def _generation_and_cost_section(
    results: Mapping[str, Any], table: Mapping[MetricKey, Any]
) -> list[str]:
    systems = systems_of(results)
    lines: list[str] = []
    gen_cols = [(t, m) for m in GENERATION_METRICS for t in sets_with(results, m)]
    if gen_cols:
        lines += ["## Generation (greedy; pass_rate = pass@1, 95 % bootstrap CI)", ""]
        lines += _md_table(
            ["system", *(f"{t} {m}" for t, m in gen_cols)], _pivot(table, systems, gen_cols)
        )
    cost_cols = [("cost", m) for m in COST_METRICS if any(k[1:] == ("cost", m) for k in table)]
    if cost_cols:
        lines += ["## Cost (same process, same batch size)", ""]
        lines += _md_table(
            ["system", *(m for _, m in cost_cols)], _pivot(table, systems, cost_cols, digits=1)
        )
        lines += _measurement_note(results.get("measurement"))
    return lines


def _measurement_note(m: Mapping[str, Any] | None) -> list[str]:
    """How the cost table was measured, from ``results['measurement']``."""
    if not m:
        return []
    return [
        f"Batch {m.get('batch_size')}, prompts of {m.get('prompt_tokens')} tokens, "
        f"{m.get('new_tokens')} new tokens; time: {m.get('clock')}, {m.get('repeats')} timed "
        f"calls after a warm-up, {m.get('threads')} torch thread(s); peak memory (absolute, "
        f"weights included): {m.get('peak_memory')}; weights: {m.get('weights')}. Prefill: one "
        "forward building the KV cache, last-position logits only; time to first token: one "
        "request, routing included."
        + (
            f" Before any system was built the process held {m['allocated_before_systems_mb']} "
            "MiB (base model, data, tokenizer): part of every peak-memory figure."
            if m.get("allocated_before_systems_mb") is not None
            else ""
        ),
        "",
    ]


def _routing_section(results: Mapping[str, Any]) -> list[str]:
    routing = results.get("routing") or {}
    lines: list[str] = []
    router = routed_router(results)
    if router is not None:
        lines += [
            "## Router",
            "",
            f"Accuracy on the single-domain sets: {_fmt(router.get('accuracy'))}",
            "",
        ]
        per_set = router.get("per_set_accuracy") or {}
        if per_set:
            lines += _md_table(["set", "accuracy"], [[t, _fmt(a)] for t, a in per_set.items()])
        labels = router["labels"]
        rows = [
            [f"**{t}**", *map(str, row)] for t, row in zip(labels, router["confusion"], strict=True)
        ]
        lines += ["Confusion (rows true, columns predicted):", ""]
        lines += _md_table(["true \\ predicted", *labels], rows)
    usage = (routing.get("moelora") or {}).get("gate_usage") or {}
    if usage:
        experts = list(routing["moelora"].get("experts") or next(iter(usage.values())))
        lines += ["## MoE-LoRA mean gate weight per expert", ""]
        rows = [[t, *(_fmt(u.get(e)) for e in experts)] for t, u in usage.items()]
        lines += _md_table(["set", *experts], rows)
    return lines


def render_report(
    results: Mapping[str, Any], plots: Mapping[str, Path], skipped: Mapping[str, str], out_dir: Path
) -> str:
    """The markdown text of ``report.md`` (plots linked relative to ``out_dir``)."""
    table = metric_table(results)
    versions = ", ".join(f"{k} {v}" for k, v in (results.get("versions") or {}).items())
    lines = [
        f"# Evaluation report: {results.get('experiment', '?')}",
        "",
        f"- created: {results.get('created', '?')}",
        f"- git commit: {results.get('git_commit') or 'unknown'}",
        f"- device: {results.get('device', '?')}",
        f"- systems: {', '.join(systems_of(results))}",
        f"- sets: {', '.join(results['sets'])}",
    ]
    if versions:
        lines.append(f"- versions: {versions}")
    lines.append("")
    lines += _quality_section(results, table)
    lines += _accuracy_section(results, table)
    lines += _generation_and_cost_section(results, table)
    lines += _routing_section(results)
    lines += ["## Plots", ""]
    for stem, (title, _draw, _missing) in PLOTS.items():
        if stem in plots:
            lines += [f"### {title}", "", f"![{title}]({plots[stem].relative_to(out_dir)})", ""]
        else:
            lines += [f"### {title}", "", f"_Skipped: {skipped[stem]} in the results._", ""]
    return "\n".join(lines)


def write_report(results: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """Write ``report.md`` and the PNG plots (under ``plots/``) into ``out_dir``; return their paths.

    A plot whose data is absent is skipped and the report says why.
    """
    validate_results(results)
    out = Path(out_dir)
    plots, skipped = write_plots(results, out / "plots")
    report = out / "report.md"
    atomic_write_text(report, render_report(results, plots, skipped, out))
    return [report, *plots.values()]
