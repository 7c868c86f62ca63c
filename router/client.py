"""A thin OpenAI-compatible chat client that routes ``model="auto"`` requests.

``model="auto"`` -> the router decides and the body is rewritten for the target server; any other
``model`` passes through untouched. Before the first routed request the client checks the server's
``/v1/models`` so a missing adapter fails loudly (``MissingAdapterError``) instead of silently
running the base model. vLLM lists every LoRA module there, so its check is exact; SGLang, LoRAX
and TGI list only the base model, so for them the check covers the base model alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from router.decision import Decision
from router.targets import TARGETS, AdapterMap, ServerRequest, openai_model, openai_request

if TYPE_CHECKING:
    from router.core import Router

AUTO = "auto"


class MissingAdapterError(RuntimeError):
    """The server does not serve a model the router may pick."""


@dataclass(frozen=True)
class RoutedResponse:
    """The server's JSON answer, the request that was sent, and the decision (None if passed through)."""

    response: dict[str, Any]
    request: ServerRequest
    decision: Decision | None


class RoutedClient:
    """Route and send OpenAI chat requests to a vLLM / SGLang / LoRAX / TGI server.

    ``transport`` is handed to ``httpx.Client`` (tests pass ``httpx.MockTransport``).
    """

    def __init__(
        self,
        base_url: str,
        router: Router,
        adapters: AdapterMap,
        target: str = "vllm",
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        check_models: bool = True,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if target not in TARGETS:
            raise ValueError(f"unknown server target {target!r}; expected one of {TARGETS}")
        for label in router.labels:
            adapters.adapter_for(label)  # every label the router can pick must be servable
        self.router = router
        self.adapters = adapters
        self.target = target
        self.check_models_first = check_models
        self._checked = False
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=base_url, headers=headers, timeout=timeout, transport=transport
        )

    def list_models(self) -> list[str]:
        """Model ids from the server's ``/v1/models``."""
        r = self._http.get("/v1/models")
        r.raise_for_status()
        data = r.json().get("data")
        if not isinstance(data, list):
            raise MissingAdapterError(f"{r.url}: no 'data' list in the /v1/models answer")
        return [str(m.get("id")) for m in data if isinstance(m, Mapping)]

    def expected_models(self) -> set[str]:
        """The ids ``/v1/models`` must list for every label to be served as intended."""
        if self.target == "vllm":
            return {openai_model("vllm", label, self.adapters) for label in self.router.labels}
        return {self.adapters.base_model}

    def check_models(self) -> None:
        """Raise ``MissingAdapterError`` naming every expected model the server does not list."""
        served = set(self.list_models())
        missing = sorted(self.expected_models() - served)
        if missing:
            raise MissingAdapterError(
                f"server at {self._http.base_url} does not serve {missing}; it lists {sorted(served)}"
            )
        self._checked = True

    def prepare(self, request: Mapping[str, Any]) -> tuple[ServerRequest, Decision | None]:
        """The request to send (and the decision) for an OpenAI chat request, without sending it."""
        if request.get("model") != AUTO:
            return ServerRequest("/v1/chat/completions", dict(request)), None
        decision = self.router.route(request)
        return openai_request(self.target, decision, request, self.adapters), decision

    def chat(self, request: Mapping[str, Any]) -> RoutedResponse:
        """Send a chat completion request; ``model="auto"`` is routed first."""
        if request.get("model") == AUTO and self.check_models_first and not self._checked:
            self.check_models()
        sent, decision = self.prepare(request)
        r = self._http.request(sent.method, sent.path, json=sent.json)
        if r.status_code == 404 and decision is not None:
            raise MissingAdapterError(
                f"server answered 404 for model {sent.json.get('model')!r}: {r.text[:200]}"
            )
        r.raise_for_status()
        return RoutedResponse(r.json(), sent, decision)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RoutedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
