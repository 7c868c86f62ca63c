"""OmegaConf resolvers used by ``conf/`` and helpers to turn a Hydra config into plain objects."""

from __future__ import annotations

import os
from typing import Any

from omegaconf import DictConfig, OmegaConf


def _wandb_offline() -> bool:
    """W&B logs offline unless the user asked for online (``WANDB_MODE=online``)."""
    return os.environ.get("WANDB_MODE", "offline").lower() not in ("online", "run")


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("wandb_offline"):
        OmegaConf.register_new_resolver("wandb_offline", _wandb_offline)
    if not OmegaConf.has_resolver("pid"):  # default run dirs: two runs started together differ
        OmegaConf.register_new_resolver("pid", os.getpid, use_cache=True)


def to_container(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """A resolved plain dict of a config (for manifests, results and loggers)."""
    if isinstance(cfg, DictConfig):
        out = OmegaConf.to_container(cfg, resolve=True)
        assert isinstance(out, dict)
        return {str(k): v for k, v in out.items()}
    return dict(cfg)


register_resolvers()
