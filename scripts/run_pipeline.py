"""The main job: `python scripts/run_pipeline.py [experiment=quick_cpu|paper|smoke] [overrides]`."""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import loralab  # noqa: F401  (registers config resolvers)
from loralab.pipeline import run_pipeline


@hydra.main(config_path="../conf", config_name="run_pipeline", version_base="1.3")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    run_pipeline(cfg, hydra_cfg.runtime.choices["experiment"], list(hydra_cfg.overrides.task))


if __name__ == "__main__":
    main()
