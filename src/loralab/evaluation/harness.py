"""Run every system on every evaluation set and collect the results dict (see ``report.py``)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning import seed_everything
from omegaconf import DictConfig
from tqdm import tqdm

from loralab.artifacts import read_manifest, verify_adapter
from loralab.base_model import load_base_model, resolve_device, weights_fingerprint
from loralab.config import to_container
from loralab.data.records import Record
from loralab.evaluation.build import RouterChoices, build_systems
from loralab.evaluation.cost import measure_system_cost
from loralab.evaluation.generation import extract_code, generate_reply, generation_sets, run_checks
from loralab.evaluation.sandbox import isolation
from loralab.evaluation.sets import EvalSet, build_eval_sets
from loralab.evaluation.stats import gap_recovery_metrics, nll_metrics, paired_tests, rouge_l
from loralab.evaluation.systems import (
    ModelSystem,
    RequestLevelSystem,
    System,
    gold_label,
    shareable_options,
)
from loralab.provenance import git_commit, package_versions

log = logging.getLogger(__name__)

# Results of single-model choices over the shared PEFT model, keyed by (set, example index, choice):
# the oracle and the router mostly pick what a single expert (or the base) already ran on that
# example, so their NLL and replies are looked up instead of recomputed. Weighted mixtures are not.
ChoiceMemo = dict[tuple[str, int, str | None], Any]


def _choices(system: System, records: Sequence[Record]) -> list[tuple[str | None, ...] | None]:
    if not isinstance(system, RequestLevelSystem):
        return [None] * len(records)
    return [shareable_options(system.choose(r)) for r in records]


def score_set(
    system: System,
    eval_set: EvalSet,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    memo: ChoiceMemo | None = None,
) -> dict[str, list]:
    """Per-example summed NLL and target-token count, in the set's record order."""
    n = len(eval_set.records)
    sums, counts = np.zeros(n), np.zeros(n, dtype=np.int64)
    memo = {} if memo is None else memo
    system.prepare(eval_set.records)
    for idx, batch, records in eval_set.batches(batch_size, pad_id, device):
        options = _choices(system, records)
        keys = [
            [(eval_set.name, i, o) for o in opts] if opts else None
            for i, opts in zip(idx, options, strict=True)
        ]
        if all(k and all(key in memo for key in k) for k in keys):
            best = [min((memo[key] for key in k), key=lambda sc: sc[0]) for k in keys if k]
            sums[idx], counts[idx] = [b[0] for b in best], [b[1] for b in best]
            continue
        s, c = system.nll(batch, records)
        sums[idx], counts[idx] = s.float().cpu().numpy(), c.cpu().numpy()
        for i, k in zip(idx, keys, strict=True):
            if k and len(k) == 1:
                memo[k[0]] = (float(sums[i]), int(counts[i]))
    return {"nll_sum": sums.tolist(), "n_tokens": counts.tolist()}


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


@torch.no_grad()
def gate_summary(
    system: ModelSystem,
    sets: Mapping[str, EvalSet],
    n_heatmaps: int,
    tokenizer: Any,
    pad_id: int,
    device: torch.device,
) -> dict[str, Any]:
    """MoE-LoRA's mean gate weight per expert on each set's response tokens, and per-token
    heatmaps (mean over layers) of the first two-domain examples."""
    model = system.model
    slots = list(model.slot_names)
    usage: dict[str, dict[str, float]] = {}
    for name, eval_set in sets.items():
        total = torch.zeros(len(slots))
        count = 0
        for _, batch, _ in eval_set.batches(8, pad_id, device):
            w = (
                model.gate_weights(batch["input_ids"], batch["attention_mask"]).float().mean(2)
            )  # [B, T, S]
            mask = batch["labels"] != -100
            total += w[mask].sum(0).cpu()
            count += int(mask.sum())
        usage[name] = {s: float(v) for s, v in zip(slots, total / max(1, count), strict=True)}
    heatmaps = []
    pairs = sets.get("two_domain")
    for i in range(min(n_heatmaps, len(pairs.records) if pairs else 0)):
        assert pairs is not None
        ids = torch.tensor([pairs.examples[i].input_ids], device=device)
        w = model.gate_weights(ids, torch.ones_like(ids)).float().mean(2)[0]  # [T, S]
        start = pairs.examples[i].labels.index(
            next(t for t in pairs.examples[i].labels if t != -100)
        )
        heatmaps.append(
            {
                "tokens": [tokenizer.decode([t]) for t in pairs.examples[i].input_ids[start:]],
                "weights": w[start:].cpu().tolist(),
                "domains": pairs.records[i].domain.split("+"),
            }
        )
    return {"experts": slots, "gate_usage": usage, "heatmaps": heatmaps}


def generation_metrics(
    systems: Mapping[str, System], cfg: DictConfig, tokenizer: Any, device: torch.device
) -> tuple[list[dict[str, Any]], dict[str, dict[str, list[dict[str, Any]]]]]:
    """``pass_rate`` on ``gen_code`` (MBPP, executed in a sandboxed subprocess), ``rougeL``
    elsewhere; and every reply with its score, per system and set."""
    gen = cfg.eval.generation
    sets = generation_sets(cfg.data, int(gen.per_set))
    out = []
    replies: dict[str, dict[str, list[dict[str, Any]]]] = {}
    memo: ChoiceMemo = {}
    for name, system in systems.items():
        started = time.perf_counter()
        replies[name] = {}
        for set_name, items in sets.items():
            scored: list[dict[str, Any]] = []
            system.prepare([item.record for item in items])
            options = _choices(system, [item.record for item in items])
            for i, (item, opts) in enumerate(zip(items, options, strict=True)):
                key = (set_name, i, opts[0]) if opts else None  # best-of generates with its first
                if key is not None and key in memo:
                    scored.append(memo[key])
                    continue
                reply = generate_reply(
                    system,
                    tokenizer,
                    item,
                    int(gen.max_new_tokens),
                    int(gen.max_prompt_tokens),
                    device,
                )
                if item.tests:
                    code = extract_code(reply)
                    score = float(run_checks(code, item.tests, item.setup, float(gen.timeout_s)))
                else:
                    score = rouge_l(reply, item.record.response)
                scored.append({"id": item.record.id, "reply": reply, "score": score})
                if key is not None:
                    memo[key] = scored[-1]
            replies[name][set_name] = scored
            scores = [r["score"] for r in scored]
            metric = "pass_rate" if set_name == "gen_code" else "rougeL"
            out.append(
                {
                    "system": name,
                    "set": set_name,
                    "metric": metric,
                    "value": float(np.mean(scores)),
                    "ci_low": None,
                    "ci_high": None,
                }
            )
        log.info("generated %s (%.0f s)", name, time.perf_counter() - started)
    return out, replies


def cost_metrics(
    systems: Mapping[str, System],
    sets: Mapping[str, EvalSet],
    cfg: DictConfig,
    pad_id: int,
    device: torch.device,
) -> list[dict[str, Any]]:
    """Prefill / decode tokens/s, time to first token and peak memory, same batch for every system.

    The batch takes prompts from each single-domain set in turn (so routers see every domain),
    cut to ``eval.cost.prompt_tokens`` tokens.
    """
    c = cfg.eval.cost
    width, size = int(c.prompt_tokens), int(c.batch_size)
    pool = [
        (s, i)
        for i in range(max(len(s.records) for s in sets.values()))
        for s in sets.values()
        if s.name != "two_domain" and i < len(s.records)
    ]
    rows, recs = [], []
    for s, i in pool:
        ids = s.examples[i].input_ids
        if len(ids) >= width:
            rows.append(ids[:width])
            recs.append(s.records[i])
        if len(rows) == size:
            break
    if not rows:
        raise ValueError(f"no evaluation prompt has {width} tokens: lower eval.cost.prompt_tokens")
    input_ids = torch.tensor(rows, device=device)
    out: list[dict[str, Any]] = []
    for name, system in systems.items():
        log.info("cost: %s", name)
        values = measure_system_cost(
            system, recs, input_ids, int(c.new_tokens), int(c.repeats), pad_id
        )
        out.extend(
            {
                "system": name,
                "set": "cost",
                "metric": k,
                "value": v,
                "ci_low": None,
                "ci_high": None,
            }
            for k, v in values.items()
        )
    return out


def evaluated_artifacts(
    manifests: Mapping[str, Mapping[str, Any]],
    systems: Mapping[str, System],
    choices: RouterChoices | None,
    moelora_dir: str | Path | None,
    xlora_dir: str | Path | None,
) -> dict[str, Any]:
    """The exact files evaluated: each adapter's sha256 (weights and config), the router's model
    version, the MoE-LoRA gate's and the X-LoRA classifier's sha256 (those of the systems run)."""
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
        out["router"] = {"model_version": choices.router.model_version}
    if "moelora" in systems and moelora_dir is not None:
        from moelora import read_gate_metadata

        out["moelora_gate"] = {"gate_sha256": read_gate_metadata(moelora_dir)["gate_sha256"]}
    if "xlora" in systems and xlora_dir is not None:
        xlora_manifest = read_manifest(xlora_dir)
        out["xlora_classifier"] = {"classifier_sha256": xlora_manifest["classifier_sha256"]}
    return out


def evaluate(
    cfg: DictConfig,
    experts_dir: str | Path,
    router_dir: str | Path | None = None,
    moelora_dir: str | Path | None = None,
    xlora_dir: str | Path | None = None,
) -> dict[str, Any]:
    """The head-to-head comparison: every system in ``cfg.eval.systems`` on every set."""
    seed_everything(int(cfg.seed), workers=True)
    started = time.perf_counter()
    device = resolve_device(cfg.base_model.get("device", "auto"))
    experts = [str(d) for d in cfg.data.domains]
    base, tokenizer = load_base_model(cfg.base_model, cfg.paths.cache_dir)
    fingerprint = weights_fingerprint(base)
    del base
    adapters = {d: Path(experts_dir) / d for d in experts}
    manifests = {d: verify_adapter(path, fingerprint) for d, path in adapters.items()}
    pad_id = int(tokenizer.pad_token_id)
    sets = build_eval_sets(cfg.data, cfg.eval, tokenizer, experts)
    systems, choices = build_systems(cfg, adapters, fingerprint, router_dir, moelora_dir, xlora_dir)
    boot = cfg.eval.bootstrap
    per_example: dict[str, dict[str, Any]] = {}
    metrics: list[dict[str, Any]] = []
    memo: ChoiceMemo = {}
    for name, system in tqdm(systems.items(), desc="systems"):
        started_system = time.perf_counter()
        per_example[name] = {}
        for set_name, eval_set in sets.items():
            scored = score_set(system, eval_set, int(cfg.eval.batch_size), pad_id, device, memo)
            per_example[name][set_name] = scored
            metrics.extend(
                nll_metrics(
                    name,
                    set_name,
                    scored["nll_sum"],
                    scored["n_tokens"],
                    int(boot.n),
                    int(boot.seed),
                    float(boot.alpha),
                )
            )
        log.info("scored %s (%.0f s)", name, time.perf_counter() - started_system)
    metrics.extend(gap_recovery_metrics(metrics))
    generations: dict[str, Any] = {}
    if cfg.eval.generation.per_set and int(cfg.eval.generation.per_set) > 0:
        generation, generations = generation_metrics(systems, cfg, tokenizer, device)
        metrics.extend(generation)
    if cfg.eval.cost.enabled:
        metrics.extend(cost_metrics(systems, sets, cfg, pad_id, device))
    routing: dict[str, Any] = {}
    if choices is not None:
        routing["router"] = routing_summary(choices, sets, experts)
    moe = systems.get("moelora")
    if isinstance(moe, ModelSystem):
        routing["moelora"] = gate_summary(
            moe, sets, int(cfg.eval.heatmap_examples), tokenizer, pad_id, device
        )
    tests = {}
    for a, b in cfg.eval.paired_tests:
        if a in per_example and b in per_example:
            tests[f"{a}_vs_{b}"] = paired_tests(
                per_example, a, b, int(boot.n), int(boot.seed), float(boot.alpha)
            )
    return {
        "experiment": str(cfg.get("experiment_name") or cfg.get("task_name")),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "versions": package_versions(),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "config": to_container(cfg),
        "systems": list(systems),
        "sets": list(sets),
        "n_examples": {name: len(s.records) for name, s in sets.items()},
        "metrics": [
            m
            for m in metrics
            if not (
                isinstance(m["value"], float)
                and math.isnan(m["value"])
                and m["metric"] != "gap_recovery"
            )
        ],
        "per_example": per_example,
        "paired_tests": tests,
        "routing": routing,
        "generations": generations,
        "base_fingerprint": fingerprint,
        "artifacts": evaluated_artifacts(manifests, systems, choices, moelora_dir, xlora_dir),
        "sandbox": isolation() if generations else None,
        "elapsed_s": time.perf_counter() - started,
    }
