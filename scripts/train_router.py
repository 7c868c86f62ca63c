"""Train, evaluate and save the request-level router: `python scripts/train_router.py [overrides]`."""

import hydra
from omegaconf import DictConfig

import loralab  # noqa: F401  (registers config resolvers)
from loralab.routing import train_router


@hydra.main(config_path="../conf", config_name="train_router", version_base="1.3")
def main(cfg: DictConfig) -> None:
    train_router(cfg)


if __name__ == "__main__":
    main()
