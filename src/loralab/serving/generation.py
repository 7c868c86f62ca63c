"""One completion request, from body to answer: checks, routing, the engine, the OpenAI bodies.

The clock starts when the request arrives, so time to first token includes tokenising and the
router's decision (``auto``). A request holds its adapter (``registry.acquire``) until its last
token, so an unload waits for it and an eviction skips it. A client that goes away (a closed
stream, or a dropped connection while a whole answer is awaited) cancels its row.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from loralab.serving.decoding import SamplingParams
from loralab.serving.engine import (
    EngineRequest,
    EngineStoppedError,
    ErrorEvent,
    Event,
    FinishEvent,
    QueueFullError,
    TokenEvent,
)
from loralab.serving.errors import APIError, bad_request, error_body, not_found, unavailable
from loralab.serving.loading import ServingState
from loralab.serving.registry import Adapter
from loralab.serving.schemas import ChatCompletionRequest, CompletionRequest
from moelora import GATE

Body = ChatCompletionRequest | CompletionRequest
DISCONNECT_CHECK_S = 0.25  # how often a whole-answer request checks that its client is still there


@dataclass
class Job:
    """A checked, routed request on its way through the engine."""

    body: Body
    chat: bool
    prompt_ids: list[int]
    params: SamplingParams
    served: str  # base | an adapter | moe
    route: dict[str, Any]
    arrival: float
    adapter: Adapter | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))
    first_token_at: float | None = None

    @property
    def metric_labels(self) -> tuple[str, str]:
        return self.body.model, "gate" if self.served == "moe" else self.served


async def prepare(state: ServingState, body: Body, chat: bool) -> Job:
    """Check the request (400 / 404 naming the field), tokenise it and route it."""
    arrival = time.perf_counter()
    mode = _mode(state, body.model)
    prompt_ids = _tokenize(state, body, chat)
    params = _sampling(state, body, len(prompt_ids), chat)
    route: dict[str, Any] = {"model": mode}
    served = mode
    if mode == "auto":
        decision = await state.router.aroute(_router_input(body, chat))
        state.metrics.routing.labels(decision.label, decision.reason.value).inc()
        served = "base" if decision.label == state.router.base_label else decision.label
        route = {"model": served, **_decision_fields(decision)}
        if served != "base" and state.registry.get(served) is None:
            raise unavailable(f"the router chose {served!r}, which this server does not serve")
    adapter = None
    if served not in ("base", "moe"):
        adapter = await state.registry.acquire(served)
    return Job(body, chat, prompt_ids, params, served, route, arrival, adapter)


def _mode(state: ServingState, name: str) -> str:
    if name in ("base", state.base_name):
        return "base"
    if name == "moe" and not state.has_gate:
        raise not_found(f"the model 'moe' is not served: {state.run_dir} has no trained gate")
    if name == "auto" and state.router is None:
        raise not_found(f"the model 'auto' is not served: {state.run_dir} has no router")
    if name in ("moe", "auto") or state.registry.get(name) is not None:
        return name
    served = ["base", "auto", "moe", *(a.name for a in state.registry.adapters())]
    raise not_found(f"the model {name!r} does not exist; served: {served}")


def _tokenize(state: ServingState, body: Body, chat: bool) -> list[int]:
    tokenizer = state.tokenizer
    if isinstance(body, ChatCompletionRequest):
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        except Exception as error:  # the template refused the conversation (e.g. a role order)
            raise bad_request(
                f"messages: the chat template refused them ({error})", "messages"
            ) from None
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise bad_request("prompt: send one prompt per request", "prompt")
            prompt = prompt[0]
        ids = tokenizer(prompt)["input_ids"] if prompt else []
    if not ids:
        raise bad_request("the prompt is empty", "messages" if chat else "prompt")
    return list(ids)


def _sampling(state: ServingState, body: Body, prompt_tokens: int, chat: bool) -> SamplingParams:
    s = state.settings
    field_name = "messages" if chat else "prompt"
    if prompt_tokens >= s.max_model_len:
        raise bad_request(
            f"the prompt has {prompt_tokens} tokens; this model's maximum context length is "
            f"{s.max_model_len} tokens (prompt and answer together)",
            field_name,
        )
    asked = body.max_tokens
    if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
        asked = body.max_completion_tokens
    if isinstance(body, CompletionRequest) and body.echo:
        raise bad_request("echo=true is not supported", "echo")
    if asked is not None and asked > s.max_tokens:
        raise bad_request(
            f"max_tokens={asked} is over this server's cap of {s.max_tokens}", "max_tokens"
        )
    if asked is not None and prompt_tokens + asked > s.max_model_len:
        raise bad_request(
            f"max_tokens={asked} plus the prompt's {prompt_tokens} tokens is over this model's "
            f"maximum context length of {s.max_model_len} tokens",
            "max_tokens",
        )
    stop = body.stop_strings()
    if len(stop) > 4 or any(len(x) > 256 for x in stop):
        raise bad_request("stop: at most 4 strings of at most 256 characters", "stop")
    max_tokens = asked or min(s.default_max_tokens, s.max_model_len - prompt_tokens)
    temperature = s.default_temperature if body.temperature is None else body.temperature
    top_p = s.default_top_p if body.top_p is None else body.top_p
    return SamplingParams(
        max_tokens, temperature, top_p, stop, body.seed, body.ignore_eos, body.return_gate_weights
    )


def _router_input(body: Body, chat: bool) -> Any:
    if isinstance(body, ChatCompletionRequest):
        return {"messages": [{"role": m.role, "content": m.text()} for m in body.messages]}
    return body.prompt if isinstance(body.prompt, str) else "".join(body.prompt)


def _decision_fields(decision: Any) -> dict[str, Any]:
    return {
        "label": decision.label,
        "reason": decision.reason.value,
        "probs": {k: round(v, 6) for k, v in decision.probs.items()},
        "margin": round(decision.margin, 6),
        "predicted": decision.predicted,
        "model_version": decision.model_version,
        "latency_ms": round(decision.latency_ms, 3),
    }


def route_headers(job: Job) -> dict[str, str]:
    route = job.route
    headers = {"x-loralab-route-model": str(route["model"])}
    for key in ("label", "reason", "model_version", "latency_ms"):
        if key in route:
            headers[f"x-loralab-route-{key.replace('_', '-')}"] = str(route[key])
    if "probs" in route:
        headers["x-loralab-route-probs"] = json.dumps(route["probs"], separators=(",", ":"))
    return headers


async def respond(state: ServingState, job: Job, request: Request) -> Response:
    """Run the job; a whole answer or a stream of server-sent events."""
    queue: asyncio.Queue[Event] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def sink(event: Event) -> None:  # called on the engine's thread
        loop.call_soon_threadsafe(queue.put_nowait, event)

    choice = GATE if job.served == "moe" else (None if job.served == "base" else job.served)
    engine_request = EngineRequest(job.prompt_ids, choice, job.params, sink, job.id)
    try:
        state.engine.submit(engine_request)
    except (QueueFullError, EngineStoppedError) as error:
        await _finish(state, job, "rejected", None)
        raise unavailable(str(error)) from None
    headers = route_headers(job)
    if job.body.stream:
        stream = _stream(state, job, engine_request, queue)
        return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
    return await _whole(state, job, engine_request, queue, request, headers)


async def _events(queue: asyncio.Queue[Event]) -> AsyncIterator[Event]:
    while True:
        event = await queue.get()
        yield event
        if isinstance(event, FinishEvent | ErrorEvent):
            return


async def _whole(
    state: ServingState,
    job: Job,
    engine_request: EngineRequest,
    queue: asyncio.Queue[Event],
    request: Request,
    headers: dict[str, str],
) -> Response:
    texts: list[str] = []
    gates: list[Any] = []
    ids: list[int] = []
    status, finish = "cancelled", None
    checked = time.monotonic()
    try:
        while True:
            try:
                event = await asyncio.wait_for(queue.get(), timeout=DISCONNECT_CHECK_S)
            except asyncio.TimeoutError:
                event = None
            if time.monotonic() - checked >= DISCONNECT_CHECK_S:
                checked = time.monotonic()
                if await request.is_disconnected():  # nobody will read the answer: free the row
                    engine_request.cancel()
                    return Response(status_code=499)
            if event is None:
                continue
            if isinstance(event, ErrorEvent):
                status = "error"
                raise APIError(
                    500, f"generation failed: {type(event.error).__name__}: {event.error}"
                )
            if job.first_token_at is None:
                job.first_token_at = time.perf_counter()
            if isinstance(event, TokenEvent):
                texts.append(event.text)
                ids.append(event.token_id)
                if job.params.gate_weights:
                    gates.append(event.gate)
            else:
                texts.append(event.text)
                finish, status = event, "ok"
                break
    finally:
        if status != "ok":
            engine_request.cancel()
        await _finish(state, job, status, finish)
    assert finish is not None
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish.reason, "logprobs": None}
    if job.chat:
        choice["message"] = {"role": "assistant", "content": "".join(texts)}
    else:
        choice["text"] = "".join(texts)
    if job.params.gate_weights:
        choice["gate_weights"] = gates
    if job.body.return_token_ids:
        choice["token_ids"] = ids
    body = _envelope(state, job, chunk=False)
    body.update(choices=[choice], usage=_usage(finish), route=job.route)
    if job.body.return_token_ids:
        body["prompt_token_ids"] = job.prompt_ids
    return JSONResponse(body, headers=headers)


async def _stream(
    state: ServingState, job: Job, engine_request: EngineRequest, queue: asyncio.Queue[Event]
) -> AsyncIterator[str]:
    status, finish = "cancelled", None
    try:
        first = _chunk(state, job, {"role": "assistant", "content": ""} if job.chat else "", None)
        first["route"] = job.route
        if job.params.gate_weights:
            first["gate_slots"] = state.gate_slots
        if job.body.return_token_ids:
            first["prompt_token_ids"] = job.prompt_ids
        yield _sse(first)
        async for event in _events(queue):
            if isinstance(event, ErrorEvent):
                status = "error"
                message = f"generation failed: {type(event.error).__name__}: {event.error}"
                yield _sse(error_body(500, message))
                break
            if job.first_token_at is None:
                job.first_token_at = time.perf_counter()
            if isinstance(event, TokenEvent):
                extras = job.params.gate_weights or job.body.return_token_ids
                if not event.text and not extras:
                    continue
                chunk = _chunk(state, job, _delta(job, event.text), None)
                if job.params.gate_weights:
                    chunk["choices"][0]["gate_weights"] = event.gate
                if job.body.return_token_ids:
                    chunk["choices"][0]["token_ids"] = [event.token_id]
                yield _sse(chunk)
            else:
                finish, status = event, "ok"
                yield _sse(_chunk(state, job, _delta(job, event.text), event.reason))
                options = job.body.stream_options
                if options is not None and options.include_usage:
                    usage = _envelope(state, job, chunk=True)
                    usage.update(choices=[], usage=_usage(event))
                    yield _sse(usage)
        yield "data: [DONE]\n\n"
    finally:
        if status != "ok":
            engine_request.cancel()
        await _finish(state, job, status, finish)


def _delta(job: Job, text: str) -> Any:
    return {"content": text} if job.chat else text


def _chunk(state: ServingState, job: Job, delta: Any, reason: str | None) -> dict[str, Any]:
    body = _envelope(state, job, chunk=True)
    choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
    if job.chat:
        choice["delta"] = delta
    else:
        choice["text"] = delta
    body["choices"] = [choice]
    return body


def _envelope(state: ServingState, job: Job, chunk: bool) -> dict[str, Any]:
    kind = ("chat.completion" if job.chat else "text_completion") + (
        ".chunk" if chunk and job.chat else ""
    )
    body: dict[str, Any] = {
        "id": ("chatcmpl-" if job.chat else "cmpl-") + job.id,
        "object": kind,
        "created": job.created,
        "model": job.body.model,
    }
    if job.params.gate_weights and not chunk:
        body["gate_slots"] = state.gate_slots
    return body


def _usage(finish: FinishEvent) -> dict[str, int]:
    return {
        "prompt_tokens": finish.prompt_tokens,
        "completion_tokens": finish.completion_tokens,
        "total_tokens": finish.prompt_tokens + finish.completion_tokens,
    }


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _finish(state: ServingState, job: Job, status: str, finish: FinishEvent | None) -> None:
    """Release the adapter and record the request's metrics (once per request)."""
    if job.adapter is not None:
        adapter, job.adapter = job.adapter, None
        await state.registry.release(adapter)
    m, labels = state.metrics, job.metric_labels
    m.requests.labels(*labels, status).inc()
    if finish is not None:
        now = time.perf_counter()
        m.prompt_tokens.labels(*labels).inc(finish.prompt_tokens)
        m.generation_tokens.labels(*labels).inc(finish.completion_tokens)
        m.latency.labels(*labels).observe(now - job.arrival)
        if job.first_token_at is not None:
            m.ttft.labels(*labels).observe(job.first_token_at - job.arrival)
