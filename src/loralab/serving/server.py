"""Run the app with uvicorn: in the foreground (``serve``) or in a thread (``ServerThread``, for tests
and in-process benchmarks)."""

from __future__ import annotations

import logging
import threading
import time
from types import TracebackType

import uvicorn
from omegaconf import DictConfig

from loralab.serving.app import create_app
from loralab.serving.loading import ServingState, build_state

log = logging.getLogger(__name__)


def serve(cfg: DictConfig) -> None:
    """Build everything ``cfg`` names, then serve until interrupted."""
    state = build_state(cfg)
    settings = state.settings
    modes = ["base", *(["auto"] if state.router else []), *(["moe"] if state.has_gate else [])]
    log.info(
        "serving %s and adapters %s of %s on http://%s:%d/v1",
        modes,
        [a.name for a in state.registry.adapters()],
        state.run_dir,
        settings.host,
        settings.port,
    )
    uvicorn.run(
        create_app(state), host=settings.host, port=settings.port, log_config=None, access_log=False
    )


class ServerThread:
    """The app served by uvicorn in a daemon thread on ``host:port`` (port 0: a free one)."""

    def __init__(self, state: ServingState, host: str = "127.0.0.1", port: int = 0) -> None:
        self.state = state
        config = uvicorn.Config(
            create_app(state), host=host, port=port, log_config=None, access_log=False
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, name="loralab-http", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def start(self, timeout_s: float = 60.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start (see the log)")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(30)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
