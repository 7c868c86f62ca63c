"""Load benchmark of the server: `python scripts/bench_serve.py [experiment=smoke] [bench.vllm=true]`.

Starts `scripts/serve.py` on a free loopback port with the same run and overrides, runs the loads
of `loralab.serving.bench`, stops it; the last line printed is the JSON summary.
"""

import json
import logging

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import loralab  # noqa: F401  (registers config resolvers)
from loralab.serving.bench import run_bench
from loralab.serving.loading import ensure_run

FORWARDED = ("experiment", "base_model", "server.", "paths.", "train_if_missing")


@hydra.main(config_path="../conf", config_name="bench_serve", version_base="1.3")
def main(cfg: DictConfig) -> float:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per request
    run_dir = ensure_run(cfg)
    if cfg.bench.engines:
        from loralab.serving.bench_engines import compare_engines

        engines = compare_engines(cfg)
        print(json.dumps(engines), flush=True)
        return float(engines[str(cfg.bench.engine_concurrency[-1])]["loralab_mixed_tokens_per_s"])
    overrides = [
        o for o in HydraConfig.get().overrides.task if o.lstrip("+~").startswith(FORWARDED)
    ]
    result = run_bench(cfg, [*overrides, f"run_dir={run_dir}"])
    logging.getLogger(__name__).info("bench_serve: %s", result)
    print(json.dumps(result), flush=True)
    return float(result["tokens_per_s"])


if __name__ == "__main__":
    main()
