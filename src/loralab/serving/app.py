"""The OpenAI-compatible HTTP API (FastAPI) over a ``ServingState``.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (streaming or not),
``GET /v1/models``, ``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter`` (vLLM's bodies),
``GET /health`` (never needs a key), ``GET /metrics`` (Prometheus), the playground page at ``/``. With ``server.api_key`` set,
every other endpoint needs ``Authorization: Bearer <key>``; load / unload need
``server.admin_api_key`` when that is set. Every error is ``{"error": {...}}`` (errors.py).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from loralab.serving import generation
from loralab.serving.errors import APIError, error_body
from loralab.serving.loading import ServingState
from loralab.serving.metrics import CONTENT_TYPE
from loralab.serving.playground import mount_playground
from loralab.serving.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    LoadLoraRequest,
    ModelCard,
    ModelList,
    UnloadLoraRequest,
)

log = logging.getLogger(__name__)

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 500, 503)
}


def create_app(state: ServingState) -> FastAPI:
    """The app; its lifespan starts the engine and loads ``server.lora_modules`` (pinned)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not state.engine.running:
            state.engine.start()
        for name, path in state.settings.lora_modules.items():  # a failure stops the start-up
            await state.registry.load(name, path, pinned=True)
        try:
            yield
        finally:
            state.engine.stop()

    app = FastAPI(
        title="loralab",
        summary="base, each LoRA expert, auto (router) and moe (MoE-LoRA) in one batch",
        version="1",
        lifespan=lifespan,
    )
    app.state.serving = state
    _install_error_handlers(app)
    settings = state.settings

    async def need_key(request: Request) -> None:
        _check_key(request, settings.api_key)

    async def need_admin_key(request: Request) -> None:
        _check_key(request, settings.admin_api_key or settings.api_key)
        if not settings.runtime_lora_updating:
            raise APIError(403, "runtime adapter loading is off (server.runtime_lora_updating)")

    @app.get("/health")
    async def health() -> Response:
        if not state.engine.running:
            return JSONResponse(error_body(503, "the engine is not running"), status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", dependencies=[Depends(need_key)])
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", dependencies=[Depends(need_key)], responses=_ERRORS)
    async def models() -> ModelList:
        server = {
            "gate_slots": state.gate_slots,
            "runtime_lora_updating": settings.runtime_lora_updating,
            "load_needs_key": (settings.admin_api_key or settings.api_key) is not None,
        }
        return ModelList(data=_cards(state), loralab=server)

    @app.post("/v1/chat/completions", dependencies=[Depends(need_key)], responses=_ERRORS)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        job = await generation.prepare(state, body, chat=True)
        return await generation.respond(state, job, request)

    @app.post("/v1/completions", dependencies=[Depends(need_key)], responses=_ERRORS)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        job = await generation.prepare(state, body, chat=False)
        return await generation.respond(state, job, request)

    @app.post("/v1/load_lora_adapter", dependencies=[Depends(need_admin_key)], responses=_ERRORS)
    async def load_lora_adapter(body: LoadLoraRequest) -> dict[str, Any]:
        adapter = await state.registry.load(body.lora_name, body.lora_path)
        return {
            "object": "lora_adapter",
            "id": adapter.name,
            "root": adapter.root,
            "status": "loaded",
        }

    @app.post("/v1/unload_lora_adapter", dependencies=[Depends(need_admin_key)], responses=_ERRORS)
    async def unload_lora_adapter(body: UnloadLoraRequest) -> dict[str, Any]:
        await state.registry.unload(body.lora_name)
        return {"object": "lora_adapter", "id": body.lora_name, "status": "unloaded"}

    mount_playground(app)
    return app


def _check_key(request: Request, key: str | None) -> None:
    if key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(
        given.strip().encode(), key.encode()
    ):
        raise APIError(401, "a valid API key is needed: send 'Authorization: Bearer <key>'")


def _cards(state: ServingState) -> list[ModelCard]:
    created = min((a.created for a in state.registry.adapters()), default=0)
    length = state.settings.max_model_len

    def _virtual_card(model_id: str, info: dict[str, Any]) -> ModelCard:
        """A name served over the base weights alone (``auto``, ``moe``): no root of its own."""
        return ModelCard(
            id=model_id,
            created=created,
            root=state.base_name,
            parent=state.base_name,
            max_model_len=length,
            loralab=info,
        )

    cards = [
        ModelCard(
            id="base",
            created=created,
            root=state.base_name,
            max_model_len=length,
            loralab={"kind": "base"},
        )
    ]
    if state.router is not None:
        info = {
            "kind": "router",
            "labels": list(state.router.labels),
            "model_version": state.router.model_version,
        }
        cards.append(_virtual_card("auto", info))
    if state.has_gate:
        info = {"kind": "moe", "experts": state.model.gate_expert_names, "slots": state.gate_slots}
        cards.append(_virtual_card("moe", info))
    for adapter in state.registry.adapters():
        info = {
            "kind": "lora",
            "resident": adapter.resident,
            "pinned": adapter.pinned,
            "sha256": adapter.sha256,
        }
        cards.append(
            ModelCard(
                id=adapter.name,
                created=adapter.created,
                root=adapter.root,
                parent=state.base_name,
                max_model_len=length,
                loralab=info,
            )
        )
    return cards


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        location = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(location) or None
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message = f"the body is not valid JSON ({first.get('ctx', {}).get('error', message)})"
            param = None
        elif first.get("type") == "missing" and param:
            message = f"field '{param}' is required"
        elif param:
            message = f"field '{param}': {message}"
        return JSONResponse(error_body(400, message, param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            error_body(error.status_code, str(error.detail)),
            status_code=error.status_code,
            headers=getattr(error, "headers", None),
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(
            error_body(500, f"internal error: {type(error).__name__}"), status_code=500
        )
