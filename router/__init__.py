"""Request-level router: pick the law / code / medical expert or the base model for a request.

Light to import (numpy only); sentence-transformers loads when an encoder is built and httpx when
the client is used.

    import router
    r = router.load("outputs/train_router/<run>/router")
    d = r.route({"messages": [{"role": "user", "content": "What is the statute of frauds?"}]})
    d.label, d.reason, d.probs
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from router.calibration import Thresholds
from router.core import Router
from router.decision import Decision, Reason
from router.encoders import EncoderSpec, HashingEncoder, build_encoder
from router.inputs import InputPolicy
from router.persistence import EncoderMismatchError, RouterFileError
from router.targets import (
    AdapterMap,
    ServerRequest,
    UnknownAdapterError,
    native_request,
    openai_request,
)

if TYPE_CHECKING:
    from pathlib import Path

    from router.client import (
        AsyncRoutedClient,
        ClientError,
        MissingAdapterError,
        RoutedClient,
        ServerError,
        ServerUnavailableError,
    )
    from router.encoders import Encoder

__all__ = [
    "AdapterMap",
    "AsyncRoutedClient",
    "ClientError",
    "Decision",
    "EncoderMismatchError",
    "EncoderSpec",
    "HashingEncoder",
    "InputPolicy",
    "MissingAdapterError",
    "Reason",
    "RoutedClient",
    "Router",
    "RouterFileError",
    "ServerError",
    "ServerRequest",
    "ServerUnavailableError",
    "Thresholds",
    "UnknownAdapterError",
    "build_encoder",
    "load",
    "native_request",
    "openai_request",
]


def load(path: str | Path, encoder: Encoder | None = None) -> Router:
    """Load a saved router folder (see ``Router.load``)."""
    return Router.load(path, encoder)


_CLIENT_NAMES = (
    "AsyncRoutedClient",
    "ClientError",
    "MissingAdapterError",
    "RoutedClient",
    "ServerError",
    "ServerUnavailableError",
)


def __getattr__(name: str) -> Any:  # the client pulls in httpx: import it on first use only
    if name in _CLIENT_NAMES:
        from router import client

        return getattr(client, name)
    raise AttributeError(f"module 'router' has no attribute {name!r}")
