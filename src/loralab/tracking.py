"""Experiment tracking from config: Lightning loggers for training, a ``Tracker`` for other jobs.

``cfg.logger`` maps backend names (``csv``, ``wandb``, ``tensorboard``) to Lightning logger configs
(``conf/logger/``). Every job always writes plain files under its run dir too, so results never
depend on a tracking service.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from omegaconf import DictConfig

from loralab.config import to_container
from loralab.io_utils import atomic_write_json

log = logging.getLogger(__name__)


def build_lightning_loggers(cfg: DictConfig, name: str | None = None) -> list[Any]:
    """Instantiate every logger under ``cfg.logger``; ``name`` sets the run's name (e.g. a domain)."""
    from hydra.utils import instantiate

    loggers = []
    for key, lcfg in (cfg.get("logger") or {}).items():
        if not isinstance(lcfg, Mapping) or "_target_" not in lcfg:
            continue
        kwargs: dict[str, Any] = {}
        if name is not None and key == "wandb":
            kwargs["name"] = f"{cfg.get('task_name', 'run')}-{name}"
        elif name is not None:
            kwargs["version"] = name  # <save_dir>/<logger name>/<run name>/
        logger = instantiate(lcfg, **kwargs)
        logger.log_hyperparams(to_container(cfg))
        loggers.append(logger)
    return loggers


class Tracker:
    """Metrics, tables, images and a summary for one run, to files plus W&B / TensorBoard.

    Files: ``<dir>/metrics.jsonl``, ``<dir>/tables/<key>.csv``, ``<dir>/summary.json``.
    """

    def __init__(
        self,
        run_dir: str | Path,
        name: str,
        logger_cfg: Mapping[str, Any] | None = None,
        group: str | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.summary: dict[str, Any] = {}
        self._wandb: Any = None
        self._tb: Any = None
        logger_cfg = logger_cfg or {}
        if "wandb" in logger_cfg:
            import wandb

            w = logger_cfg["wandb"]
            self._wandb = wandb.init(
                project=w.get("project", "loralab"),
                group=group or w.get("group"),
                name=name,
                tags=list(w.get("tags") or []),
                dir=str(w.get("save_dir") or self.dir),
                mode="offline" if w.get("offline", True) else "online",
                config=config,
                reinit="create_new",
            )
        if "tensorboard" in logger_cfg:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.dir / "tensorboard"))

    @classmethod
    def from_config(
        cls, cfg: DictConfig, name: str, group: str | None = None, subdir: str = ""
    ) -> Tracker:
        """A tracker writing to ``<cfg.paths.output_dir>/<subdir>`` with ``cfg.logger``'s backends."""
        logger_cfg = to_container(cfg.logger) if cfg.get("logger") else {}
        run_dir = Path(cfg.paths.output_dir) / subdir
        return cls(run_dir, name, logger_cfg, group or cfg.get("task_name"), to_container(cfg))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        with (self.dir / "metrics.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self._wandb is not None:
            self._wandb.log(dict(metrics), step=step)
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, float(v), global_step=step or 0)

    def log_table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        path = self.dir / "tables" / f"{key.replace('/', '_')}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            writer.writerows(rows)
        if self._wandb is not None:
            import wandb

            self._wandb.log({key: wandb.Table(columns=list(columns), data=[list(r) for r in rows])})

    def log_image(self, key: str, path: str | Path) -> None:
        if self._wandb is not None:
            import wandb

            self._wandb.log({key: wandb.Image(str(path))})
        if self._tb is not None:
            import matplotlib.image as mpimg

            self._tb.add_image(key, mpimg.imread(str(path)), dataformats="HWC")

    def log_summary(self, values: Mapping[str, Any]) -> None:
        self.summary.update(values)
        atomic_write_json(self.dir / "summary.json", self.summary)
        if self._wandb is not None:
            self._wandb.summary.update(dict(values))

    def finish(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.finish()
