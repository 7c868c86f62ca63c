"""``RoutedClient`` / ``AsyncRoutedClient`` with ``model="auto"`` against a real vLLM (marker
``vllm``): the adapter the router picks is the one vLLM runs (the answer's ``model`` field)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from router import AdapterMap, Router
from router.client import (
    AsyncRoutedClient,
    MissingAdapterError,
    RoutedClient,
    ServerError,
)
from tests.router.tests_router_helpers import QUESTIONS

pytestmark = pytest.mark.vllm

TIMEOUT_S = 60.0


class RecordingTransport(httpx.BaseTransport):
    """The real HTTP transport, remembering every request it sends."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.sent: list[tuple[str, str]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append((request.method, request.url.path))
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


def _adapters(served_run: dict, **override: str) -> AdapterMap:
    return AdapterMap(
        served_run["name"], {"law": "law", "code": "code", "medical": "medical", **override}
    )


def _chat(text: str, model: str = "auto") -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 6,
        "temperature": 0,
    }


def test_auto_runs_the_adapter_the_router_picked(
    vllm_server: Any, served_run: dict, toy_router: Router
) -> None:
    with RoutedClient(vllm_server.url, toy_router, _adapters(served_run), timeout=TIMEOUT_S) as c:
        for label in ("law", "code", "medical", "base"):
            out = c.chat(_chat(QUESTIONS[label]))
            assert out.decision is not None and out.decision.label == label
            served = served_run["name"] if label == "base" else label
            assert out.request.json["model"] == served
            assert out.response["model"] == served  # what vLLM says it ran
            assert out.response["usage"]["completion_tokens"] >= 1


def test_other_models_pass_through(vllm_server: Any, served_run: dict, toy_router: Router) -> None:
    transport = RecordingTransport()
    with RoutedClient(vllm_server.url, toy_router, _adapters(served_run), transport=transport) as c:
        out = c.chat(_chat(QUESTIONS["law"], model="medical"))  # a law question, asked of medical
    assert out.decision is None
    assert out.response["model"] == "medical"
    assert transport.sent == [("POST", "/v1/chat/completions")]


def test_unserved_adapter_fails_before_anything_is_sent(
    vllm_server: Any, served_run: dict, toy_router: Router
) -> None:
    transport = RecordingTransport()
    adapters = _adapters(served_run, medical="medical-v2")
    with (
        RoutedClient(vllm_server.url, toy_router, adapters, transport=transport) as c,
        pytest.raises(MissingAdapterError, match=r"does not serve \['medical-v2'\]"),
    ):
        c.chat(_chat(QUESTIONS["law"]))
    assert transport.sent == [("GET", "/v1/models")]


def test_vllm_404_becomes_a_clear_error(
    vllm_server: Any, served_run: dict, toy_router: Router
) -> None:
    adapters = _adapters(served_run, medical="medical-v2")
    with RoutedClient(vllm_server.url, toy_router, adapters, check_models=False) as c:
        with pytest.raises(MissingAdapterError) as missing:
            c.chat(_chat(QUESTIONS["medical"]))
        with pytest.raises(ServerError) as unknown:
            c.chat(_chat(QUESTIONS["law"], model="no-such-model"))
    assert "label 'medical'" in str(missing.value)
    assert "`medical-v2` does not exist" in str(missing.value)
    assert (unknown.value.status_code, unknown.value.error_type) == (404, "NotFoundError")
    assert "`no-such-model` does not exist" in unknown.value.message
    assert unknown.value.url == f"{vllm_server.url}/v1/chat/completions"


def test_stream_equals_the_whole_answer(
    vllm_server: Any, served_run: dict, toy_router: Router
) -> None:
    with RoutedClient(vllm_server.url, toy_router, _adapters(served_run), timeout=TIMEOUT_S) as c:
        whole = c.chat(_chat(QUESTIONS["code"]))
        with c.stream(_chat(QUESTIONS["code"])) as s:
            chunks = list(s)
    assert s.decision is not None and s.decision.label == "code"
    assert len(chunks) >= 2 and {ch["model"] for ch in chunks} == {"code"}
    text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"])
    assert text == whole.response["choices"][0]["message"]["content"]


def test_async_client_against_vllm(vllm_server: Any, served_run: dict, toy_router: Router) -> None:
    async def main() -> None:
        async with AsyncRoutedClient(
            vllm_server.url, toy_router, _adapters(served_run), timeout=TIMEOUT_S
        ) as c:
            labels = ["law", "code", "medical", "base"]
            outs = await asyncio.gather(*(c.chat(_chat(QUESTIONS[lb])) for lb in labels))
            for label, out in zip(labels, outs, strict=True):
                assert out.decision is not None and out.decision.label == label
                assert out.response["model"] == (served_run["name"] if label == "base" else label)
            async with c.stream(_chat(QUESTIONS["medical"])) as s:
                models = {ch["model"] async for ch in s}
            assert models == {"medical"}
            with pytest.raises(ServerError, match="HTTP 404"):
                await c.chat(_chat(QUESTIONS["law"], model="no-such-model"))

        async with AsyncRoutedClient(
            vllm_server.url, toy_router, _adapters(served_run, law="law-v2")
        ) as c:
            with pytest.raises(MissingAdapterError, match="law-v2"):
                await c.chat(_chat(QUESTIONS["code"]))

    asyncio.run(main())
