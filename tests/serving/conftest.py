"""A served run built in seconds, and servers over it on loopback.

The run is laid out like a pipeline run: random law / code / medical experts on the tiny Llama
(random A and B, so each mode gives visibly different tokens), a fresh gate saved over them
(``moe`` mixes them per token) and the router tests' toy router (hashing encoder). Servers run
the real app under uvicorn in a thread of the test process, so tests can also reach the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import compose
from tests.router.tests_router_helpers import fit_toy_router

EXPERTS = ("law", "code", "medical")
LIMITS = ["server.max_model_len=256", "server.max_tokens=128", "server.default_max_tokens=16"]


def serve_config(run_dir: Path, out: Path, overrides: list[str] | None = None) -> Any:
    return compose(
        "serve", ["experiment=smoke", f"run_dir={run_dir}", *LIMITS, *(overrides or [])], out
    )


@pytest.fixture(scope="session")
def served_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from loralab.base_model import load_base_model, weights_fingerprint
    from loralab.training.random_experts import make_random_experts
    from moelora import MoELoraModel, save_gate
    from router import HashingEncoder

    run = tmp_path_factory.mktemp("served_run")
    cfg = serve_config(run, run / "cfg")
    base, _ = load_base_model(cfg.base_model, cfg.paths.cache_dir, device="cpu")
    fingerprint = weights_fingerprint(base)
    adapters = make_random_experts(
        base, EXPERTS, run / "experts" / "adapters", fingerprint, str(cfg.base_model.name), r=4
    )
    with MoELoraModel.from_adapters(base, adapters) as model:
        save_gate(model, run / "moelora" / "moelora")
    encoder = HashingEncoder()
    toy = fit_toy_router(encoder)
    toy.save(run / "router" / "router")
    return {"dir": run, "adapters": adapters, "fingerprint": fingerprint, "cfg": cfg}


@pytest.fixture(scope="session")
def start_server(
    served_run: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Any]]:
    """start_server(overrides) -> a started ServerThread (stopped at the end of the session)."""
    from loralab.serving.loading import build_state
    from loralab.serving.server import ServerThread

    started: list[ServerThread] = []

    def start(overrides: list[str] | None = None, run_dir: Path | None = None) -> ServerThread:
        out = tmp_path_factory.mktemp("serve")
        state = build_state(serve_config(run_dir or served_run["dir"], out, overrides))
        server = ServerThread(state).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def server(start_server: Callable[..., Any]) -> Any:
    """The shared server (default settings); tests must leave it as they found it."""
    return start_server()


@pytest.fixture(scope="session")
def client(server: Any) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
