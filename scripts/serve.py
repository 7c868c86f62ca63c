"""Serve a pipeline run over an OpenAI-compatible API: `python scripts/serve.py [overrides]`."""

import hydra
from omegaconf import DictConfig

import loralab  # noqa: F401  (registers config resolvers)
from loralab.serving.server import serve


@hydra.main(config_path="../conf", config_name="serve", version_base="1.3")
def main(cfg: DictConfig) -> None:
    serve(cfg)


if __name__ == "__main__":
    main()
