"""The clients' HTTP edge cases against mock servers: error bodies of every shape, streaming (SSE),
the asyncio client, and servers that are down or never answer. Fast; never the network."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from tests_router_helpers import QUESTIONS

from router import AdapterMap, Router
from router.client import (
    AsyncRoutedClient,
    MissingAdapterError,
    RoutedClient,
    ServerError,
    ServerUnavailableError,
    error_details,
)

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
ADAPTERS = AdapterMap(BASE, {"law": "law", "code": "code", "medical": "medical"})
SERVED = [BASE, "law", "code", "medical"]
# vLLM's 404 for an unknown model, as it sends it now and as older releases (and SGLang) did.
NOT_FOUND_NESTED = {
    "error": {
        "message": "The model `medical` does not exist.",
        "type": "NotFoundError",
        "param": "model",
        "code": 404,
    }
}
NOT_FOUND_FLAT = {
    "object": "error",
    "message": "The model `medical` does not exist.",
    "type": "NotFoundError",
    "param": None,
    "code": 404,
}


def _chat(text: str, model: str = "auto", **kw: object) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}], **kw}


def _models(ids: list[str], parent: str | None = BASE) -> httpx.Response:
    data = [{"id": m, "parent": None if m == BASE else parent} for m in ids]
    return httpx.Response(200, json={"object": "list", "data": data})


def _server(chat: Callable[[dict], httpx.Response], models: list[str] = SERVED) -> tuple:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/v1/models":
            return _models(models)
        return chat(json.loads(request.content))

    return handler, seen


def _mock(router: Router, handler: Callable, **kw: Any) -> RoutedClient:
    return RoutedClient(
        "http://llm:8000", router, ADAPTERS, transport=httpx.MockTransport(handler), **kw
    )


def _sse(*events: str) -> httpx.Response:
    body = "".join(f"{e}\n\n" for e in events).encode()
    return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})


@pytest.mark.parametrize(
    ("body", "message", "kind"),
    [
        (NOT_FOUND_NESTED, "The model `medical` does not exist.", "NotFoundError"),
        (NOT_FOUND_FLAT, "The model `medical` does not exist.", "NotFoundError"),
        (
            {"error": "Input validation error", "error_type": "validation"},
            "Input validation error",
            "validation",
        ),
        ({"detail": "Not Found"}, "Not Found", ""),
        (
            {"detail": [{"loc": ["body", "messages"], "msg": "Field required"}]},
            "Field required",
            "",
        ),
        ("upstream connect error", "upstream connect error", ""),
        ("", "(empty body)", ""),
    ],
)
def test_error_details_reads_every_body_shape(body: object, message: str, kind: str) -> None:
    raw = body if isinstance(body, str) else json.dumps(body)
    got_message, got_kind = error_details(raw.encode())
    assert message in got_message
    assert got_kind == kind


@pytest.mark.parametrize("body", [NOT_FOUND_NESTED, NOT_FOUND_FLAT])
def test_404_for_a_routed_model_names_the_label_and_the_servers_message(
    toy_router: Router, body: dict
) -> None:
    handler, _ = _server(lambda b: httpx.Response(404, json=body))
    with (
        _mock(toy_router, handler, check_models=False) as client,
        pytest.raises(MissingAdapterError) as err,
    ):
        client.chat(_chat(QUESTIONS["medical"]))
    text = str(err.value)
    assert "HTTP 404" in text and "label 'medical'" in text
    assert "The model `medical` does not exist." in text
    assert "http://llm:8000/v1/chat/completions" in text


@pytest.mark.parametrize("body", [NOT_FOUND_NESTED, NOT_FOUND_FLAT])
def test_404_for_a_passed_through_model_is_a_server_error(toy_router: Router, body: dict) -> None:
    handler, _ = _server(lambda b: httpx.Response(404, json=body))
    with _mock(toy_router, handler) as client, pytest.raises(ServerError) as err:
        client.chat(_chat(QUESTIONS["law"], model="medical"))
    assert (err.value.status_code, err.value.error_type) == (404, "NotFoundError")
    assert err.value.message == "The model `medical` does not exist."
    assert err.value.url == "http://llm:8000/v1/chat/completions"


def test_server_errors_keep_status_and_message(toy_router: Router) -> None:
    bad = {"error": {"message": "max_tokens is too large", "type": "BadRequestError", "code": 400}}
    handler, _ = _server(lambda b: httpx.Response(400, json=bad))
    with (
        _mock(toy_router, handler) as client,
        pytest.raises(ServerError, match=r"HTTP 400 BadRequestError: max_tokens is too large"),
    ):
        client.chat(_chat(QUESTIONS["law"]))


def test_adapter_served_on_another_base_is_refused(toy_router: Router) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return _models(SERVED, parent="meta-llama/Llama-3.2-1B")

    with (
        _mock(toy_router, handler) as client,
        pytest.raises(MissingAdapterError, match=r"on base model 'meta-llama/Llama-3\.2-1B'"),
    ):
        client.check_models()


def test_stream_yields_chunks_until_done(toy_router: Router) -> None:
    chunk = {"model": "law", "choices": [{"delta": {"content": "Yes"}}]}
    events = [
        ": keep-alive comment",
        "data: " + json.dumps({"model": "law", "choices": [{"delta": {"role": "assistant"}}]}),
        "event: message\ndata: " + json.dumps(chunk),
        # one JSON object split over two data lines (joined with a newline, as SSE says)
        'data: {"model": "law",\ndata:  "choices": [{"delta": {"content": ", it is."}}]}',
        "data: [DONE]",
        "data: " + json.dumps({"after": "done is ignored"}),
    ]
    handler, seen = _server(lambda b: _sse(*events))
    with (
        _mock(toy_router, handler) as client,
        client.stream(_chat(QUESTIONS["law"], max_tokens=4)) as s,
    ):
        chunks = list(s)
        assert s.decision is not None and s.decision.label == "law"
    assert json.loads(seen[-1].content)["stream"] is True
    assert json.loads(seen[-1].content)["model"] == "law"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert (len(chunks), text) == (3, "Yes, it is.")


def test_error_event_inside_a_stream_raises(toy_router: Router) -> None:
    error = {"error": {"message": "engine died", "type": "InternalServerError", "code": 503}}
    handler, _ = _server(lambda b: _sse('data: {"choices": []}', "data: " + json.dumps(error)))
    with (
        _mock(toy_router, handler) as client,
        client.stream(_chat(QUESTIONS["law"])) as s,
        pytest.raises(ServerError) as err,
    ):
        list(s)
    assert (err.value.status_code, err.value.message) == (503, "engine died")


def test_stream_error_status_raises_before_iterating(toy_router: Router) -> None:
    handler, _ = _server(lambda b: httpx.Response(404, json=NOT_FOUND_FLAT))
    with (
        _mock(toy_router, handler, check_models=False) as client,
        pytest.raises(MissingAdapterError, match="does not exist"),
        client.stream(_chat(QUESTIONS["medical"])),
    ):
        pass


def test_chat_refuses_stream_true(toy_router: Router) -> None:
    handler, seen = _server(lambda b: httpx.Response(200, json={}))
    with _mock(toy_router, handler) as client, pytest.raises(ValueError, match=r"client\.stream"):
        client.chat(_chat(QUESTIONS["law"], model=BASE, stream=True))
    assert seen == []


def test_transport_failure_names_the_url(toy_router: Router) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    with (
        _mock(toy_router, handler) as client,
        pytest.raises(ServerUnavailableError, match="http://llm:8000/v1/models") as err,
    ):
        client.chat(_chat(QUESTIONS["law"]))
    assert "Connection refused" in str(err.value)


def test_server_down_on_a_real_socket(toy_router: Router) -> None:
    with socket.socket() as s:  # a port nobody listens on once this closes
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with (
        RoutedClient(url, toy_router, ADAPTERS, timeout=5) as client,
        pytest.raises(ServerUnavailableError, match=f"cannot reach the server at {url}"),
    ):
        client.chat(_chat(QUESTIONS["law"], model=BASE))


def test_server_that_never_answers_times_out(toy_router: Router) -> None:
    with socket.socket() as s:  # accepts connections (backlog) but never answers
        s.bind(("127.0.0.1", 0))
        s.listen(4)
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        with (
            RoutedClient(url, toy_router, ADAPTERS, timeout=0.3) as client,
            pytest.raises(ServerUnavailableError, match="no answer in time") as err,
        ):
            client.chat(_chat(QUESTIONS["law"], model=BASE))
    assert err.value.url == f"{url}/v1/chat/completions"


@pytest.mark.parametrize(
    ("target", "law_model", "expected"),
    [("sglang", f"{BASE}:law", {BASE}), ("lorax", "law", {BASE}), ("tgi", "law", {BASE})],
)
def test_other_targets_send_their_model_field(
    toy_router: Router, target: str, law_model: str, expected: set[str]
) -> None:
    handler, seen = _server(
        lambda b: httpx.Response(200, json={"model": b["model"], "choices": []}), models=[BASE]
    )
    with RoutedClient(
        "http://llm:8000",
        toy_router,
        ADAPTERS,
        target=target,
        transport=httpx.MockTransport(handler),
    ) as client:
        out = client.chat(_chat(QUESTIONS["law"]))
        assert client.expected_models() == expected
    assert [r.url.path for r in seen] == ["/v1/models", "/v1/chat/completions"]
    assert out.response["model"] == law_model


def test_async_client_routes_streams_and_fails_like_the_blocking_one(toy_router: Router) -> None:
    def chat(body: dict) -> httpx.Response:
        if body["model"] == "medical":
            return httpx.Response(404, json=NOT_FOUND_NESTED)
        if body.get("stream"):
            return _sse(
                "data: " + json.dumps({"model": body["model"], "choices": []}), "data: [DONE]"
            )
        return httpx.Response(200, json={"model": body["model"], "choices": []})

    handler, seen = _server(chat, models=SERVED)

    async def main() -> None:
        async with AsyncRoutedClient(
            "http://llm:8000", toy_router, ADAPTERS, transport=httpx.MockTransport(handler)
        ) as client:
            outs = await asyncio.gather(
                *(client.chat(_chat(QUESTIONS[label])) for label in ("law", "code", "base"))
            )
            assert [o.response["model"] for o in outs] == ["law", "code", BASE]
            async with client.stream(_chat(QUESTIONS["code"])) as s:
                chunks = [c async for c in s]
            assert [c["model"] for c in chunks] == ["code"]
            with pytest.raises(MissingAdapterError, match="does not exist"):
                await client.chat(_chat(QUESTIONS["medical"]))
            with pytest.raises(ServerError, match="HTTP 404"):
                await client.chat(_chat(QUESTIONS["law"], model="medical"))

    asyncio.run(main())
    assert sum(r.url.path == "/v1/models" for r in seen) >= 1


def test_async_client_server_down(toy_router: Router) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def main() -> None:
        async with AsyncRoutedClient(f"http://127.0.0.1:{port}", toy_router, ADAPTERS) as client:
            await client.chat(_chat(QUESTIONS["law"]))

    with pytest.raises(ServerUnavailableError, match=f"127.0.0.1:{port}/v1/models"):
        asyncio.run(main())
