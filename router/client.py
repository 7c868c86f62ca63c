"""OpenAI-compatible chat clients (blocking and asyncio) that route ``model="auto"`` requests.

``model="auto"`` -> the router decides and the body is rewritten for the target server; any other
``model`` passes through untouched. Before the first routed request the client checks the server's
``/v1/models`` so a missing adapter fails loudly (``MissingAdapterError``) before anything is sent,
instead of silently running the base model. vLLM lists every LoRA module there (with its ``parent``
base model), so its check is exact; SGLang, LoRAX and TGI list only the base model, so for them the
check covers the base model alone.

Failures are typed and name the URL: ``ServerUnavailableError`` (refused, unreachable, timed out),
``ServerError`` (an HTTP error answer, with the server's own message from the OpenAI
``{"error": {...}}`` body, the older flat ``{"object": "error", "message": ...}`` one, TGI's
``{"error": "..."}`` or FastAPI's ``{"detail": ...}``), and ``MissingAdapterError`` (a model the
router may pick is not served, or the server answered 404 for it).

Streaming (server-sent events): ``with client.stream(request) as s: for chunk in s: ...``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from router.decision import Decision
from router.targets import TARGETS, AdapterMap, ServerRequest, openai_model, openai_request

if TYPE_CHECKING:
    from router.core import Router

AUTO = "auto"
_DONE = "[DONE]"


class ClientError(RuntimeError):
    """A request through a routed client failed."""


class ServerUnavailableError(ClientError):
    """The server could not be reached or did not answer in time."""

    def __init__(self, message: str, url: str) -> None:
        super().__init__(message)
        self.url = url


class ServerError(ClientError):
    """The server answered with an HTTP error (or an error event inside a stream)."""

    def __init__(self, url: str, status_code: int, message: str, error_type: str = "") -> None:
        kind = f" {error_type}" if error_type else ""
        super().__init__(f"{url}: HTTP {status_code}{kind}: {message}")
        self.url, self.status_code, self.message = url, status_code, message
        self.error_type = error_type


class MissingAdapterError(ClientError):
    """The server does not serve a model the router may pick."""


def error_details(body: bytes | str) -> tuple[str, str]:
    """``(message, type)`` from an error body of any of the shapes OpenAI-style servers send."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return text.strip()[:500] or "(empty body)", ""
    if isinstance(obj, dict):
        err = obj.get("error")
        if isinstance(err, dict):  # OpenAI / current vLLM: {"error": {"message", "type", "code"}}
            return str(err.get("message", err)), str(err.get("type") or "")
        if isinstance(err, str):  # TGI: {"error": "...", "error_type": "..."}
            return err, str(obj.get("error_type") or "")
        if "message" in obj:  # older vLLM / SGLang: {"object": "error", "message", "type"}
            return str(obj["message"]), str(obj.get("type") or "")
        if "detail" in obj:  # FastAPI: {"detail": "Not Found"} or a validation error list
            detail = obj["detail"]
            return detail if isinstance(detail, str) else json.dumps(detail)[:500], ""
    return text.strip()[:500], ""


def _raise_for_answer(r: httpx.Response, sent: ServerRequest, decision: Decision | None) -> None:
    """Turn an HTTP error answer (body already read) into the client's typed errors."""
    if r.is_success:
        return
    message, error_type = error_details(r.content)
    if r.status_code == 404 and decision is not None:
        raise MissingAdapterError(
            f"{r.url}: HTTP 404 for model {sent.json.get('model')!r}, which the router picked for "
            f"label {decision.label!r}: {message}"
        )
    raise ServerError(str(r.url), r.status_code, message, error_type)


def _unavailable(e: httpx.TransportError, url: str, timeout: float | None) -> ClientError:
    if isinstance(e, httpx.TimeoutException):
        return ServerUnavailableError(
            f"{url}: no answer in time ({type(e).__name__}, timeout {timeout} s)", url
        )
    return ServerUnavailableError(f"cannot reach the server at {url}: {type(e).__name__}: {e}", url)


class _SSEDecoder:
    """Server-sent events, line by line: ``feed`` returns an event's ``data`` when it completes
    (multi-line data joined with newlines); ``event:``, ``id:``, ``retry:`` and comments are
    dropped (a chat stream needs none of them)."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        if line.startswith("data:"):
            self._data.append(line[5:].removeprefix(" "))
        elif line == "" and self._data:
            return self.flush()
        return None

    def flush(self) -> str | None:
        data, self._data = self._data, []
        return "\n".join(data) if data else None


def _chunk(data: str, url: str) -> dict[str, Any] | None:
    """One parsed stream chunk; None at ``[DONE]``; an error event raises ``ServerError``."""
    if data.strip() == _DONE:
        return None
    try:
        chunk = json.loads(data)
    except json.JSONDecodeError as e:
        raise ServerError(url, 200, f"stream event is not JSON ({e.msg}): {data[:200]!r}") from None
    if isinstance(chunk, dict) and "error" in chunk:
        message, error_type = error_details(json.dumps(chunk))
        err = chunk["error"]
        code = err.get("code") if isinstance(err, dict) else chunk.get("code")
        raise ServerError(url, code if isinstance(code, int) else 500, message, error_type)
    return chunk


@dataclass(frozen=True)
class RoutedResponse:
    """The server's JSON answer, the request that was sent, and the decision (None if passed through)."""

    response: dict[str, Any]
    request: ServerRequest
    decision: Decision | None


class RoutedStream:
    """An open streamed answer: iterate for the parsed chunks (ends at ``[DONE]``)."""

    def __init__(self, r: httpx.Response, request: ServerRequest, decision: Decision | None):
        self.http_response, self.request, self.decision = r, request, decision

    def __iter__(self) -> Iterator[dict[str, Any]]:
        sse, url = _SSEDecoder(), str(self.http_response.url)
        for line in self.http_response.iter_lines():
            data = sse.feed(line)
            if data is not None:
                chunk = _chunk(data, url)
                if chunk is None:
                    return
                yield chunk
        data = sse.flush()
        if data is not None and (chunk := _chunk(data, url)) is not None:
            yield chunk


class AsyncRoutedStream(RoutedStream):
    """``RoutedStream`` for the asyncio client: ``async for chunk in stream``."""

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        sse, url = _SSEDecoder(), str(self.http_response.url)
        async for line in self.http_response.aiter_lines():
            data = sse.feed(line)
            if data is not None:
                chunk = _chunk(data, url)
                if chunk is None:
                    return
                yield chunk
        data = sse.flush()
        if data is not None and (chunk := _chunk(data, url)) is not None:
            yield chunk


class _RoutedBase:
    """What the blocking and asyncio clients share: validation, model checks, request building."""

    def __init__(self, router: Router, adapters: AdapterMap, target: str, check_models: bool):
        if target not in TARGETS:
            raise ValueError(f"unknown server target {target!r}; expected one of {TARGETS}")
        for label in router.labels:
            adapters.adapter_for(label)  # every label the router can pick must be servable
        self.router = router
        self.adapters = adapters
        self.target = target
        self.check_models_first = check_models
        self._checked = False

    def expected_models(self) -> set[str]:
        """The ids ``/v1/models`` must list for every label to be served as intended."""
        if self.target == "vllm":
            return {openai_model("vllm", label, self.adapters) for label in self.router.labels}
        return {self.adapters.base_model}

    def _model_cards(self, r: httpx.Response) -> list[Mapping[str, Any]]:
        _raise_for_answer(r, ServerRequest("/v1/models", {}, "GET"), None)
        data = r.json().get("data")
        if not isinstance(data, list):
            raise MissingAdapterError(f"{r.url}: no 'data' list in the /v1/models answer")
        return [m for m in data if isinstance(m, Mapping)]

    def _check_cards(self, cards: list[Mapping[str, Any]], url: str) -> None:
        served = {str(m.get("id")): m for m in cards}
        missing = sorted(self.expected_models() - set(served))
        if missing:
            raise MissingAdapterError(
                f"server at {url} does not serve {missing}; it lists {sorted(served)}"
            )
        if self.target == "vllm":  # vLLM names each LoRA's base model in "parent"
            for adapter in set(self.adapters.adapters.values()) & set(served):
                parent = served[adapter].get("parent")
                if parent is not None and parent != self.adapters.base_model:
                    raise MissingAdapterError(
                        f"server at {url} serves adapter {adapter!r} on base model {parent!r}, "
                        f"not {self.adapters.base_model!r}"
                    )
        self._checked = True

    def _must_check(self, request: Mapping[str, Any]) -> bool:
        return request.get("model") == AUTO and self.check_models_first and not self._checked

    def _build(
        self, request: Mapping[str, Any], decision: Decision | None, stream: bool
    ) -> ServerRequest:
        if not stream and request.get("stream"):
            raise ValueError("request has stream=true: use client.stream(request) instead of chat")
        if decision is None:
            sent = ServerRequest("/v1/chat/completions", dict(request))
        else:
            sent = openai_request(self.target, decision, request, self.adapters)
        if stream:
            sent.json["stream"] = True
        return sent


class RoutedClient(_RoutedBase):
    """Route and send OpenAI chat requests to a vLLM / SGLang / LoRAX / TGI server (blocking).

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
        super().__init__(router, adapters, target, check_models)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=base_url, headers=headers, timeout=timeout, transport=transport
        )

    def _send(
        self, method: str, path: str, body: Any = None, stream: bool = False
    ) -> httpx.Response:
        request = self._http.build_request(method, path, json=body)
        try:
            r = self._http.send(request, stream=stream)
            if stream and not r.is_success:
                r.read()
            return r
        except httpx.TransportError as e:
            raise _unavailable(e, str(request.url), self._http.timeout.read) from e

    def list_models(self) -> list[str]:
        """Model ids from the server's ``/v1/models``."""
        return [str(m.get("id")) for m in self._model_cards(self._send("GET", "/v1/models"))]

    def check_models(self) -> None:
        """Raise ``MissingAdapterError`` naming every expected model the server does not list."""
        r = self._send("GET", "/v1/models")
        self._check_cards(self._model_cards(r), str(self._http.base_url))

    def prepare(self, request: Mapping[str, Any]) -> tuple[ServerRequest, Decision | None]:
        """The request to send (and the decision) for an OpenAI chat request, without sending it."""
        decision = self.router.route(request) if request.get("model") == AUTO else None
        return self._build(request, decision, stream=bool(request.get("stream"))), decision

    def chat(self, request: Mapping[str, Any]) -> RoutedResponse:
        """Send a chat completion request; ``model="auto"`` is routed first."""
        if self._must_check(request):
            self.check_models()
        decision = self.router.route(request) if request.get("model") == AUTO else None
        sent = self._build(request, decision, stream=False)
        r = self._send(sent.method, sent.path, sent.json)
        _raise_for_answer(r, sent, decision)
        return RoutedResponse(r.json(), sent, decision)

    @contextmanager
    def stream(self, request: Mapping[str, Any]) -> Iterator[RoutedStream]:
        """Send with ``stream=true``; yields a ``RoutedStream`` of parsed chunks, closed on exit."""
        if self._must_check(request):
            self.check_models()
        decision = self.router.route(request) if request.get("model") == AUTO else None
        sent = self._build(request, decision, stream=True)
        r = self._send(sent.method, sent.path, sent.json, stream=True)
        try:
            _raise_for_answer(r, sent, decision)
            yield RoutedStream(r, sent, decision)
        finally:
            r.close()

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RoutedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncRoutedClient(_RoutedBase):
    """``RoutedClient`` for asyncio services (``httpx.AsyncClient``); routing runs in a worker
    thread so the event loop never waits on the encoder."""

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
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(router, adapters, target, check_models)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            base_url=base_url, headers=headers, timeout=timeout, transport=transport
        )

    async def _send(
        self, method: str, path: str, body: Any = None, stream: bool = False
    ) -> httpx.Response:
        request = self._http.build_request(method, path, json=body)
        try:
            r = await self._http.send(request, stream=stream)
            if stream and not r.is_success:
                await r.aread()
            return r
        except httpx.TransportError as e:
            raise _unavailable(e, str(request.url), self._http.timeout.read) from e

    async def list_models(self) -> list[str]:
        r = await self._send("GET", "/v1/models")
        return [str(m.get("id")) for m in self._model_cards(r)]

    async def check_models(self) -> None:
        r = await self._send("GET", "/v1/models")
        self._check_cards(self._model_cards(r), str(self._http.base_url))

    async def _decide(self, request: Mapping[str, Any]) -> Decision | None:
        if self._must_check(request):
            await self.check_models()
        return await self.router.aroute(request) if request.get("model") == AUTO else None

    async def chat(self, request: Mapping[str, Any]) -> RoutedResponse:
        decision = await self._decide(request)
        sent = self._build(request, decision, stream=False)
        r = await self._send(sent.method, sent.path, sent.json)
        _raise_for_answer(r, sent, decision)
        return RoutedResponse(r.json(), sent, decision)

    @asynccontextmanager
    async def stream(self, request: Mapping[str, Any]) -> AsyncIterator[AsyncRoutedStream]:
        decision = await self._decide(request)
        sent = self._build(request, decision, stream=True)
        r = await self._send(sent.method, sent.path, sent.json, stream=True)
        try:
            _raise_for_answer(r, sent, decision)
            yield AsyncRoutedStream(r, sent, decision)
        finally:
            await r.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncRoutedClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
