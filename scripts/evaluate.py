"""Evaluate every system on every set and write the report:
`python scripts/evaluate.py experts_dir=... router_dir=... moelora_dir=... moelora_prior_dir=... xlora_dir=...`."""

import hydra
from omegaconf import DictConfig

import loralab  # noqa: F401  (registers config resolvers)
from loralab.pipeline import evaluate_and_report


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    evaluate_and_report(cfg)


if __name__ == "__main__":
    main()
