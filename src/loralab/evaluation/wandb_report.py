"""Log an evaluation ``results`` dict to W&B: one run per system in a group, plus a comparison run.

Every system run holds the same summary keys, ``eval/<set>/<metric>`` (with ``_ci_low`` /
``_ci_high`` beside metrics that have an interval), so the project page's run table compares the
systems side by side. The ``comparison`` run holds the full metrics table, the router's confusion
matrix, MoE-LoRA's gate usage and the paired tests as ``wandb.Table``s, and the report's plots as
images. Offline by default: runs land under ``<out_dir>/wandb/offline-run-*`` for a later
``wandb sync``; the W&B service may write the last run's log a moment after ``finish()``, and all
of it is on disk once the service stops (process exit or ``wandb.teardown()``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from loralab.evaluation.plots import systems_of
from loralab.evaluation.report import CSV_COLUMNS, json_safe, validate_results

COMPARISON_RUN = "comparison"


def summary_by_system(results: Mapping[str, Any]) -> dict[str, dict[str, float | None]]:
    """``{system: {"eval/<set>/<metric>": value, ..._ci_low, ..._ci_high}}`` from the metrics."""
    out: dict[str, dict[str, float | None]] = {s: {} for s in systems_of(results)}
    for m in json_safe(results["metrics"]):
        key = f"eval/{m['set']}/{m['metric']}"
        values = out[m["system"]]
        values[key] = m["value"]
        if m["ci_low"] is not None and m["ci_high"] is not None:
            values[f"{key}_ci_low"] = m["ci_low"]
            values[f"{key}_ci_high"] = m["ci_high"]
    router = (results.get("routing") or {}).get("router") or {}
    if "router" in out:
        for set_name, accuracy in (router.get("per_set_accuracy") or {}).items():
            out["router"][f"eval/{set_name}/routing_accuracy"] = accuracy
    return out


def comparison_tables(results: Mapping[str, Any]) -> dict[str, tuple[list[Any], list[list[Any]]]]:
    """``{key: (columns, rows)}`` of the comparison run's tables; absent data gives no table."""
    safe = json_safe(results)
    tables = {
        "metrics": (list(CSV_COLUMNS), [[m[c] for c in CSV_COLUMNS] for m in safe["metrics"]])
    }
    routing = safe.get("routing") or {}
    router = routing.get("router") or {}
    if "confusion" in router:
        labels = router["labels"]
        rows = [[t, *row] for t, row in zip(labels, router["confusion"], strict=True)]
        tables["router/confusion"] = (["true", *labels], rows)
    usage = (routing.get("moelora") or {}).get("gate_usage") or {}
    if usage:
        rows = [[t, e, w] for t, u in usage.items() for e, w in u.items()]
        tables["moelora/gate_usage"] = (["set", "expert", "mean_gate_weight"], rows)
    for key in ("paired_tests", "paired_tests_accuracy"):  # NLL; accuracy and pass rate
        paired = safe.get(key) or {}
        if paired:
            rows = [
                [name, t, d["diff"], d["low"], d["high"], d["p_value"]]
                for name, sets in paired.items()
                for t, d in sets.items()
            ]
            tables[key] = (["test", "set", "diff", "low", "high", "p_value"], rows)
    return tables


def log_results_to_wandb(
    results: Mapping[str, Any],
    out_dir: str | Path,
    plots: Sequence[str | Path] | Mapping[str, str | Path] = (),
    project: str = "loralab",
    group: str | None = None,
    tags: Sequence[str] = (),
    offline: bool = True,
) -> dict[str, str]:
    """Log one run per system and a ``comparison`` run, all in ``group``; return {run name: run id}.

    Args:
        results: the evaluation results dict (see ``loralab.evaluation.report``).
        out_dir: W&B writes its run folders under ``<out_dir>/wandb/``.
        plots: PNGs to attach to the comparison run, as paths (keyed by file stem) or {key: path};
            other files (e.g. ``report.md`` from ``write_report``'s list) are ignored.
        group: the experiment; defaults to ``results["experiment"]``.
        offline: ``False`` syncs to the W&B server (needs a login).
    """
    import wandb

    validate_results(results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = dict(plots) if isinstance(plots, Mapping) else {Path(p).stem: p for p in plots}
    images = {k: Path(p) for k, p in images.items() if Path(p).suffix.lower() == ".png"}
    shared_config = json_safe(
        {k: results.get(k) for k in ("experiment", "git_commit", "device", "versions", "config")}
    )
    init: dict[str, Any] = {
        "project": project,
        "group": group or results.get("experiment") or "eval",
        "tags": list(tags),
        "dir": str(out),
        "mode": "offline" if offline else "online",
        "reinit": "create_new",
        "settings": wandb.Settings(silent=True, console="off", x_disable_stats=True),
    }
    run_ids = {}
    for system, summary in summary_by_system(results).items():
        run = wandb.init(
            name=system, job_type="eval", config={**shared_config, "system": system}, **init
        )
        try:
            run.summary.update(summary)
        finally:
            run.finish()
        run_ids[system] = run.id

    run = wandb.init(name=COMPARISON_RUN, job_type="comparison", config=shared_config, **init)
    try:
        logged: dict[str, Any] = {
            key: wandb.Table(columns=columns, data=rows)
            for key, (columns, rows) in comparison_tables(results).items()
        }
        logged.update({f"plots/{k}": wandb.Image(str(p)) for k, p in images.items()})
        run.log(logged)
        router = (results.get("routing") or {}).get("router") or {}
        if router.get("accuracy") is not None:
            run.summary["router/accuracy"] = router["accuracy"]
    finally:
        run.finish()
    run_ids[COMPARISON_RUN] = run.id
    return run_ids
