"""Shared fixtures: offline hub, Hydra composition with a temp output dir, a smoke experts run."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
# The plots every full run draws (report.md lists them; a smaller run skips some with a note).
PLOT_STEMS = {
    "nll_by_set",
    "accuracy",
    "gap_recovery",
    "pareto",
    "router_confusion",
    "gate_usage",
    "gate_heatmaps",
}


def compose(config_name: str, overrides: list[str], output_dir: Path):
    """Compose ``conf/<config_name>.yaml`` like @hydra.main would, with ``paths.output_dir`` set."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import open_dict

    import loralab  # noqa: F401  (resolvers)

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.cache_dir = str(output_dir / "cache")
    return cfg


@pytest.fixture
def compose_cfg(tmp_path: Path) -> Callable:
    def _compose(overrides: list[str] | None = None, config_name: str = "train_experts"):
        return compose(config_name, ["experiment=smoke", *(overrides or [])], tmp_path)

    return _compose


@pytest.fixture(scope="session")
def smoke_experts(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One smoke `train_experts` run shared by every test that needs trained adapters."""
    from loralab.training.train_experts import train_experts

    out = tmp_path_factory.mktemp("smoke_experts")
    cfg = compose("train_experts", ["experiment=smoke"], out)
    result = train_experts(cfg)
    return {"cfg": cfg, "dir": out, **result}


def smoke_eval_env(smoke_experts: dict, out: Path):
    """The evaluation's starting point on the smoke experiment: its config, one base model shared
    as the evaluation shares it, the tokenizer and the trained smoke adapters by domain."""
    from types import SimpleNamespace

    from loralab.base_model import load_base_model, weights_fingerprint
    from loralab.evaluation.shared_base import SharedBase

    cfg = compose("evaluate", ["experiment=smoke"], out)
    base, tok = load_base_model(cfg.base_model)
    adapters = {d: Path(p) for d, p in smoke_experts["adapters"].items()}
    shared = SharedBase(base, weights_fingerprint(base))
    return SimpleNamespace(cfg=cfg, base=base, shared=shared, tok=tok, adapters=adapters)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
