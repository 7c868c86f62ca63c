"""The summaries that go into an evaluation's results dict (schema: ``report.py``) once every
system has run: the final metric list, the paired NLL tests, the router's accuracy and confusion,
the exact artifacts evaluated and where and from what the run came."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from loralab.artifacts import read_manifest
from loralab.config import to_container
from loralab.evaluation.build import RouterChoices, gate_of
from loralab.evaluation.scoring import Scored
from loralab.evaluation.sets import EvalSet
from loralab.evaluation.stats import gap_recovery_metrics, paired_tests
from loralab.evaluation.systems import gold_label
from loralab.provenance import git_commit, package_versions


def final_metrics(
    metrics: Sequence[Mapping[str, Any]], systems: Sequence[str]
) -> list[dict[str, Any]]:
    """``metrics`` plus their ``gap_recovery`` entries, in ``systems`` order (stable; unknown
    systems last), without the entries whose value is NaN (a NaN ``gap_recovery`` is kept)."""
    out = [dict(m) for m in metrics]
    out.extend(gap_recovery_metrics(out))
    order = {name: i for i, name in enumerate(systems)}
    out.sort(key=lambda m: order.get(m["system"], len(order)))
    return [
        m
        for m in out
        if not (
            isinstance(m["value"], float)
            and math.isnan(m["value"])
            and m["metric"] != "gap_recovery"
        )
    ]


def paired_nll_tests(
    per_example: Mapping[str, Mapping[str, Scored]],
    pairs: Sequence[tuple[str, str]],
    bootstrap: Any,
) -> dict[str, Any]:
    """``{"<a>_vs_<b>": {set: test}}`` for each pair whose two systems were both scored;
    ``bootstrap``: the ``eval.bootstrap`` config (``n``, ``seed``, ``alpha``)."""
    n, seed, alpha = int(bootstrap.n), int(bootstrap.seed), float(bootstrap.alpha)
    return {
        f"{a}_vs_{b}": paired_tests(per_example, a, b, n, seed, alpha)
        for a, b in pairs
        if a in per_example and b in per_example
    }


def provenance(cfg: DictConfig, device: torch.device, threads: int) -> dict[str, Any]:
    """Which run this is: experiment name, time, git commit, package versions, device, config."""
    return {
        "experiment": str(cfg.get("experiment_name") or cfg.get("task_name")),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "versions": package_versions(),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({threads} threads)",
        "config": to_container(cfg),
    }


def routing_summary(
    choices: RouterChoices, sets: Mapping[str, EvalSet], experts: Sequence[str]
) -> dict[str, Any]:
    """Router accuracy and confusion on the single-domain sets; on two-domain sets a pick of
    either gold domain counts as right."""
    labels = [*experts, "base"]
    confusion = np.zeros((len(labels), len(labels)), dtype=int)
    per_set: dict[str, float] = {}
    latencies: list[float] = []
    for name, eval_set in sets.items():
        right = 0
        for r in eval_set.records:
            decision = choices.decisions[r.id]
            latencies.append(decision.latency_ms)
            if "+" in r.domain:
                right += decision.label in r.domain.split("+")
                continue
            gold = gold_label(r, experts)
            confusion[labels.index(gold), labels.index(decision.label)] += 1
            right += decision.label == gold
        per_set[name] = right / max(1, len(eval_set.records))
    total = int(confusion.sum())
    return {
        "labels": labels,
        "accuracy": float(np.trace(confusion) / total) if total else float("nan"),
        "confusion": confusion.tolist(),
        "per_set_accuracy": per_set,
        "latency_ms_p50": float(np.percentile(latencies, 50)) if latencies else None,
    }


def evaluated_artifacts(
    manifests: Mapping[str, Mapping[str, Any]],
    systems: Sequence[str],
    choices: RouterChoices | None,
    moelora_dir: str | Path | None,
    xlora_dir: str | Path | None,
    moelora_prior_dir: str | Path | None = None,
) -> dict[str, Any]:
    """The exact files evaluated: each adapter's sha256 (weights and config), the router's model
    version, the MoE-LoRA gates' and the X-LoRA classifier's sha256 (those of the systems run)."""
    out: dict[str, Any] = {
        "adapters": {
            d: {
                "adapter_sha256": m["adapter_sha256"],
                "adapter_config_sha256": m["adapter_config_sha256"],
            }
            for d, m in manifests.items()
        }
    }
    if choices is not None:
        out["router"] = {"model_version": choices.model_version}
    from moelora import read_gate_metadata

    gates = {gate_of(n) for n in systems}
    if "moelora" in gates and moelora_dir is not None:
        out["moelora_gate"] = {"gate_sha256": read_gate_metadata(moelora_dir)["gate_sha256"]}
    if "moelora_prior" in gates and moelora_prior_dir is not None:
        out["moelora_prior_gate"] = {
            "gate_sha256": read_gate_metadata(moelora_prior_dir)["gate_sha256"]
        }
    if "xlora" in systems and xlora_dir is not None:
        xlora_manifest = read_manifest(xlora_dir)
        out["xlora_classifier"] = {"classifier_sha256": xlora_manifest["classifier_sha256"]}
    return out
