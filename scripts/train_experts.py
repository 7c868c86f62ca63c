"""Train the law / code / medical LoRA experts: `python scripts/train_experts.py [overrides]`."""

import hydra
from omegaconf import DictConfig

import loralab  # noqa: F401  (registers config resolvers)
from loralab.training.train_experts import train_experts


@hydra.main(config_path="../conf", config_name="train_experts", version_base="1.3")
def main(cfg: DictConfig) -> None:
    train_experts(cfg)


if __name__ == "__main__":
    main()
