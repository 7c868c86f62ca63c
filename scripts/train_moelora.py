"""Train a MoE-LoRA gate over frozen experts: `python scripts/train_moelora.py experts_dir=... [overrides]`."""

import hydra
from omegaconf import DictConfig

import loralab  # noqa: F401  (registers config resolvers)
from loralab.training.moelora_gate import train_moelora


@hydra.main(config_path="../conf", config_name="train_moelora", version_base="1.3")
def main(cfg: DictConfig) -> None:
    train_moelora(cfg)


if __name__ == "__main__":
    main()
