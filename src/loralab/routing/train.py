"""``train_router(cfg)``: fit, evaluate, compare with baselines, save and log the request router.

Train split -> the classifier head and OOD prototypes; val split -> temperature and abstention
thresholds; the exam checks ``router.style_shift.checks`` names -> a ``StyleShift``; test split ->
in-distribution metrics; out-of-style check set and the hand-written probe set -> robustness
metrics. Writes ``<run dir>/router/`` (the saved router) and
``<run dir>/router_metrics.json``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from loralab.config import to_container
from loralab.data.records import default_data_root, file_sha256, router_labels
from loralab.io_utils import atomic_write_json
from loralab.routing.datasets import (
    Example,
    out_of_style_examples,
    read_label_records,
    split_examples,
)
from loralab.routing.embedding_cache import embed_examples
from loralab.routing.evaluate import (
    batch_throughput,
    evaluate_router,
    measure_latency,
    nearest_centroid_predict,
    zero_shot_predict,
)
from loralab.routing.probes import probe_items
from loralab.routing.style_shift import (
    embed_style_shift,
    exam_examples,
    style_shift_checks,
    style_shift_summary,
)
from loralab.tracking import Tracker
from router import InputPolicy, build_encoder
from router.classifier import fit_head
from router.encoders import similarity_dim
from router.fitting import FitConfig, description_prior, fit_router

log = logging.getLogger(__name__)


def fit_config(rcfg: DictConfig) -> FitConfig:
    a = rcfg.abstention
    shift = rcfg.get("style_shift") or {}
    return FitConfig(
        head=rcfg.head.kind,
        c=float(rcfg.head.c),
        hidden=tuple(rcfg.head.hidden),
        alpha=float(rcfg.head.alpha),
        max_iter=int(rcfg.head.max_iter),
        prior_weight=float(rcfg.prior.weight),
        prior_scale=float(rcfg.prior.scale),
        calibrate=bool(rcfg.calibrate),
        target_coverage=None if a.mode == "max_risk" else float(a.target_coverage),
        max_risk=float(a.max_risk) if a.mode == "max_risk" else None,
        ood_quantile=float(a.ood_quantile),
        prototypes_per_label=int(rcfg.ood_prototypes_per_label),
        head_gate=None
        if rcfg.get("head_gate") is None
        else (float(rcfg.head_gate.low_quantile), float(rcfg.head_gate.high_quantile)),
        style_shift_l2=float(shift.get("l2", 0.01)),
        style_shift_recalibrate=bool(shift.get("recalibrate", False)),
        style_shift_embedding_l2=_optional_float(shift.get("embedding_l2")),
        style_shift_train_labels=tuple(str(x) for x in (shift.get("train_labels") or [])),
        style_shift_train_weight=_optional_float(shift.get("train_weight")),
        style_shift_neighbours=_optional_int(shift.get("neighbours")),
        style_shift_neighbour_temperature=float(shift.get("neighbour_temperature", 0.05)),
        seed=int(rcfg.get("seed", 0)),
    )


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    return float((pred == y).mean()) if len(y) else 0.0


def build_examples(
    cfg: DictConfig, root: Path
) -> tuple[list[Example], list[Example], dict[str, list[Example]]]:
    """Train and val examples, and the evaluation sets ``test``, ``out_of_style`` (and ``probe``)."""
    d = cfg.router.data
    records = read_label_records(root, cfg.data.files, label_names(cfg))
    heldout = list(d.heldout_groups)

    def split(name: str, cap: Any, views: Sequence[str] = ("instruction",)) -> list[Example]:
        if isinstance(cap, DictConfig):
            cap = {str(k): v for k, v in cap.items()}
        return split_examples(
            records,
            name,
            float(cfg.data.val_fraction),
            float(cfg.data.test_fraction),
            cap,
            views=views,
            min_response_chars=int(d.min_response_chars),
            exclude_groups=heldout,
            max_generated_per_label=d.get("max_generated_per_label"),
        )

    sets = {
        "test": split("test", d.max_test_per_label),
        "out_of_style": out_of_style_examples(root, records, heldout, d.max_check_per_group),
    }
    if d.probe_set:
        sets["probe"] = [Example(t, label, f"probe/{label}", "probe") for t, label in probe_items()]
    for check, check_halves in (d.get("exam_checks") or {}).items():
        for half in check_halves or []:
            sets[f"{check}_{half}"] = exam_examples(check, half)
    return (
        split("train", d.max_train_per_label, list(d.views)),
        split("val", d.max_val_per_label, list(d.get("val_views") or ["instruction"])),
        sets,
    )


def label_names(cfg: DictConfig) -> list[str]:
    """``router.labels``, or when null (the default) ``data.domains`` then ``base``."""
    labels = cfg.router.get("labels")
    return [str(x) for x in labels] if labels else router_labels([str(d) for d in cfg.data.domains])


def label_descriptions(rcfg: DictConfig, labels: Sequence[str]) -> dict[str, list[str]]:
    """``router.descriptions``; a label without any (a newly added domain) gets one generic
    sentence naming it, with a warning: add ``router.descriptions.<label>`` for a useful prior."""
    descriptions = {str(k): [str(x) for x in v] for k, v in (rcfg.descriptions or {}).items()}
    for label in labels:
        if not descriptions.get(label):
            log.warning(
                "router.descriptions has none for label %r: using a generic one (set "
                "router.descriptions.%s to a few sentences describing the domain)",
                label,
                label,
            )
            descriptions[label] = [f"A question about {label.replace('_', ' ')}."]
    return descriptions


def train_router(cfg: DictConfig) -> dict[str, Any]:
    """Train, evaluate and save the router described by ``cfg.router`` on ``cfg.data``."""
    rcfg = cfg.router
    labels = tuple(label_names(cfg))
    out_dir = Path(cfg.paths.output_dir)
    root = Path(cfg.data.root) if cfg.data.get("root") else default_data_root()
    cache = Path(cfg.paths.cache_dir) / "router_embeddings" if rcfg.cache_embeddings else None
    batch = int(rcfg.encode_batch_size)
    t_start = time.perf_counter()

    style_checks = style_shift_checks(rcfg)
    train, val, sets = build_examples(cfg, root)
    log.info(
        "router examples: train %d, val %d, %s",
        len(train),
        len(val),
        ", ".join(f"{k} {len(v)}" for k, v in sets.items()),
    )
    descriptions = label_descriptions(rcfg, labels)
    encoder_cfg: dict[str, Any] = OmegaConf.to_container(rcfg.encoder, resolve=True)  # type: ignore[assignment]
    tuned = _finetune(rcfg, encoder_cfg, train, descriptions, labels, out_dir)
    if tuned is not None:
        encoder_cfg["name"] = str(tuned)
    t_tuned = time.perf_counter()
    encoder = build_encoder(encoder_cfg)
    encoded: dict[str, int] = {}  # texts encoded per label (the others came from the cache)
    x_train, y_train, train = embed_examples(encoder, train, labels, cache, batch, encoded)
    x_val, y_val, _ = embed_examples(encoder, val, labels, cache, batch, encoded)
    style = embed_style_shift(rcfg, style_checks, encoder, labels, cache, batch, encoded)
    embedded = {}
    for name, examples in sets.items():
        x, y, rows = embed_examples(encoder, examples, labels, cache, batch, encoded)
        groups = [_coarse_group(e.group) if name == "test" else e.group for e in rows]
        embedded[name] = (x, y, groups)
    t_encoded = time.perf_counter()

    view_weight = {str(k): float(v) for k, v in rcfg.view_weights.items()}
    weights = np.array([view_weight.get(e.view, 1.0) for e in train])
    policy = InputPolicy(**OmegaConf.to_container(rcfg.policy, resolve=True))  # type: ignore[arg-type]
    fcfg = fit_config(rcfg)
    router = fit_router(
        encoder,
        labels,
        x_train,
        y_train,
        x_val,
        y_val,
        descriptions=descriptions,
        sample_weight=weights,
        policy=policy,
        config=fcfg,
        x_style=None if style is None else style.x,
        y_style=None if style is None else style.y,
        style_groups=None if style is None else style.groups,
        style_weight=None if style is None else style.weight,
    )
    # Baseline: the same logistic regression on instructions only, no prior, no abstention.
    only = np.array([e.view == "instruction" for e in train])
    plain = fit_head(
        x_train[only],
        y_train[only],
        len(labels),
        fcfg.head,
        c=fcfg.c,
        hidden=fcfg.hidden,
        alpha=fcfg.alpha,
        max_iter=fcfg.max_iter,
        seed=fcfg.seed,
    )
    prior = router.prior or description_prior(encoder, labels, descriptions, fcfg.prior_scale)
    t_fitted = time.perf_counter()

    metrics: dict[str, Any] = {"labels": list(labels), "sets": {}, "baselines": {}}
    sim = similarity_dim(encoder)  # the similarity baselines read the sentence embedding
    for name, (x, y, groups) in embedded.items():
        metrics["sets"][name] = evaluate_router(router, x, y, groups)
        metrics["baselines"][name] = {
            "logreg_plain": _accuracy(plain.logits(x).argmax(axis=1), y),
            "nearest_centroid": _accuracy(
                nearest_centroid_predict(x_train[:, :sim], y_train, len(labels), x[:, :sim]), y
            ),
            "zero_shot_descriptions": _accuracy(zero_shot_predict(prior, x[:, :sim]), y),
        }
    requests = [e.text for e in _spread_examples(sets["test"], int(rcfg.latency_requests))]
    metrics["latency"] = {
        **measure_latency(router, requests),
        "batch_rps": batch_throughput(router, requests, batch),
    }
    metrics["router"] = {
        "temperature": router.temperature,
        "thresholds": router.thresholds.to_dict(),
        "n_train": len(train),
        "n_val": len(val),
        "encoder": encoder.fingerprint(),
        "style_shift": style_shift_summary(router, style_checks, style, x_train, y_train, fcfg),
    }
    metrics["encoded_texts"] = encoded
    metrics["timing_s"] = {
        "finetune": t_tuned - t_start,
        "encode": t_encoded - t_tuned,
        "fit": t_fitted - t_encoded,
        "evaluate": time.perf_counter() - t_fitted,
    }
    metrics["data"] = {
        "root": str(root),
        "files_sha256": {k: file_sha256(root / v) for k, v in cfg.data.files.items()},
        "heldout_groups": list(rcfg.data.heldout_groups),
    }
    router_dir = out_dir / "router"
    summary = _summary(metrics)
    version = router.save(
        router_dir,
        extra={"config": to_container(rcfg), "summary": summary},
        bundle_encoder=tuned is not None,
    )
    if tuned is not None:
        shutil.rmtree(tuned)  # the router folder now holds the tuned encoder: one copy
    metrics["model_version"] = version
    metrics["router_dir"] = str(router_dir)
    atomic_write_json(out_dir / "router_metrics.json", metrics)
    _log(cfg, metrics)
    log.info("router %s saved to %s: %s", version, router_dir, json.dumps(summary))
    return {"router_dir": str(router_dir), "model_version": version, "metrics": metrics}


def _finetune(
    rcfg: DictConfig,
    encoder_cfg: dict[str, Any],
    train: Sequence[Example],
    descriptions: dict[str, list[str]],
    labels: Sequence[str],
    out_dir: Path,
) -> Path | None:
    """``router.finetune``: the encoder tuned on the train texts and label descriptions, saved to
    ``<run dir>/encoder`` until the router bundles it (None when disabled or the encoder is not a
    sentence-transformers one)."""
    ft = rcfg.get("finetune")
    if not ft or not ft.enabled:
        return None
    from loralab.routing.finetune import FinetuneConfig, finetune_encoder
    from router.packaged_models import resolve_model_name

    if encoder_cfg.get("kind") != "sentence_transformers":
        log.info("router.finetune: a %s encoder has no weights to tune", encoder_cfg.get("kind"))
        return None
    config = FinetuneConfig.from_config(to_container(ft), seed=int(rcfg.get("seed", 0)))
    texts = {
        label: [e.text for e in train if e.label == label] + list(descriptions[label])
        for label in labels
    }
    return finetune_encoder(
        resolve_model_name(str(encoder_cfg["name"])), texts, config, out_dir / "encoder"
    )


def _coarse_group(group: str) -> str:
    """``legalbench/<task>`` -> ``legalbench`` (128 tasks would make the test table unreadable)."""
    return group.split("/")[0] if group.startswith("legalbench/") else group


def _spread_examples(examples: Sequence[Example], n: int) -> list[Example]:
    step = max(1, len(examples) // max(1, n))
    return list(examples[::step])[:n]


def _summary(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for name, rep in metrics["sets"].items():
        out[f"{name}/accuracy"] = rep["accuracy"]
        out[f"{name}/accuracy_before_abstention"] = rep["accuracy_before_abstention"]
        out[f"{name}/abstention_rate"] = rep["abstention_rate"]
        for k in ("ece", "coverage", "expert_risk", "confident_errors"):
            out[f"{name}/{k}"] = rep[k]
        for base, acc in metrics["baselines"][name].items():
            out[f"{name}/baseline/{base}"] = acc
    for k in ("p50_ms", "p99_ms", "overhead_ratio", "batch_rps"):
        if k in metrics.get("latency", {}):
            out[f"latency/{k}"] = metrics["latency"][k]
    return out


def _log(cfg: DictConfig, metrics: dict[str, Any]) -> None:
    labels = metrics["labels"]
    with Tracker.from_config(cfg, name="router") as tracker:
        tracker.log_metrics(_summary(metrics))
        for name, rep in metrics["sets"].items():
            cm = rep["confusion_matrix"]
            tracker.log_table(
                f"{name}/confusion_matrix",
                ["true \\ predicted", *labels],
                [[labels[i], *row] for i, row in enumerate(cm)],
            )
            tracker.log_table(
                f"{name}/per_label",
                ["label", "precision", "recall", "f1", "support"],
                [
                    [k, v["precision"], v["recall"], v["f1"], v["support"]]
                    for k, v in rep["per_label"].items()
                ],
            )
            tracker.log_table(
                f"{name}/coverage_risk",
                ["coverage", "risk", "threshold"],
                [[p["coverage"], p["risk"], p["threshold"]] for p in rep["coverage_risk"]],
            )
            tracker.log_table(
                f"{name}/per_group",
                ["group", "accuracy", "n"],
                [[g, v["accuracy"], v["n"]] for g, v in rep["per_group_accuracy"].items()],
            )
        tracker.log_summary({**_summary(metrics), "model_version": metrics["model_version"]})
