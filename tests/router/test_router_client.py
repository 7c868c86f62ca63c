"""The OpenAI-compatible client against a mock server (httpx.MockTransport, never the network)."""

from __future__ import annotations

import json

import httpx
import pytest
from tests_router_helpers import QUESTIONS

from router import AdapterMap, Router
from router.client import MissingAdapterError, RoutedClient

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
ADAPTERS = AdapterMap(BASE, {"law": "law-lora", "code": "code-lora", "medical": "medical-lora"})


class FakeServer:
    """Records requests; serves ``models`` in /v1/models and echoes the chosen model."""

    def __init__(self, models: list[str]) -> None:
        self.models = models
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path == "/v1/models":
            return httpx.Response(
                200, json={"object": "list", "data": [{"id": m} for m in self.models]}
            )
        body = json.loads(request.content)
        if body["model"] not in self.models:
            return httpx.Response(404, json={"error": f"model {body['model']} does not exist"})
        return httpx.Response(
            200, json={"choices": [{"message": {"content": f"answer by {body['model']}"}}]}
        )


def _client(router: Router, server: FakeServer, **kw: object) -> RoutedClient:
    return RoutedClient(
        "http://llm:8000", router, ADAPTERS, transport=httpx.MockTransport(server), **kw
    )


def _chat(text: str, model: str = "auto") -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 16}


def test_auto_routes_to_the_adapter(toy_router: Router) -> None:
    server = FakeServer([BASE, "law-lora", "code-lora", "medical-lora"])
    with _client(toy_router, server, api_key="secret") as client:
        out = client.chat(_chat(QUESTIONS["law"]))
        assert out.decision is not None and out.decision.label == "law"
        assert out.response["choices"][0]["message"]["content"] == "answer by law-lora"
        base = client.chat(_chat(QUESTIONS["base"]))
        assert base.request.json["model"] == BASE
    models_call, law_call = server.requests[0], server.requests[1]
    assert models_call.url.path == "/v1/models"
    assert law_call.url.path == "/v1/chat/completions"
    assert law_call.headers["authorization"] == "Bearer secret"
    assert json.loads(law_call.content) == {**_chat(QUESTIONS["law"]), "model": "law-lora"}
    assert sum(r.url.path == "/v1/models" for r in server.requests) == 1  # checked once


def test_other_models_pass_through_unrouted(toy_router: Router) -> None:
    server = FakeServer([BASE])
    with _client(toy_router, server) as client:
        out = client.chat(_chat(QUESTIONS["law"], model=BASE))
    assert out.decision is None
    assert [r.url.path for r in server.requests] == [
        "/v1/chat/completions"
    ]  # no model check needed
    assert json.loads(server.requests[0].content) == _chat(QUESTIONS["law"], model=BASE)


def test_missing_adapter_fails_loudly_before_sending(toy_router: Router) -> None:
    server = FakeServer([BASE, "law-lora", "code-lora"])  # medical-lora is not served
    with (
        _client(toy_router, server) as client,
        pytest.raises(MissingAdapterError, match="medical-lora"),
    ):
        client.chat(_chat(QUESTIONS["code"]))
    assert [r.url.path for r in server.requests] == ["/v1/models"]


def test_404_for_a_routed_model_is_a_missing_adapter(toy_router: Router) -> None:
    server = FakeServer([BASE])
    with (
        _client(toy_router, server, check_models=False) as client,
        pytest.raises(MissingAdapterError, match="404"),
    ):
        client.chat(_chat(QUESTIONS["law"]))


def test_lorax_target_sends_empty_model_for_base(toy_router: Router) -> None:
    server = FakeServer([BASE, ""])
    with _client(toy_router, server, target="lorax") as client:
        sent, decision = client.prepare(_chat(QUESTIONS["base"]))
        assert client.expected_models() == {BASE}
    assert decision is not None and decision.label == "base"
    assert sent.json["model"] == ""


def test_mapping_must_cover_every_label(toy_router: Router) -> None:
    from router import UnknownAdapterError

    with pytest.raises(UnknownAdapterError, match="medical"):
        RoutedClient("http://x", toy_router, AdapterMap(BASE, {"law": "l", "code": "c"}))
    with pytest.raises(ValueError, match="unknown server target"):
        RoutedClient("http://x", toy_router, ADAPTERS, target="ollama")
