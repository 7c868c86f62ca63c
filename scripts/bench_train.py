"""Print LoRA training tokens/s and peak memory for a config; the last line is JSON."""

import json

import hydra
from omegaconf import DictConfig

import loralab  # noqa: F401  (registers config resolvers)
from loralab.training.bench import bench_train


@hydra.main(config_path="../conf", config_name="bench_train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    print(json.dumps(bench_train(cfg)))


if __name__ == "__main__":
    main()
