"""Errors as values in one shape (vLLM's / OpenAI's): ``{"error": {"message", "type", "param", "code"}}``.

Every failure a client can cause or see is an ``APIError`` with its HTTP status; the app turns it
(and FastAPI's own validation errors) into that body. 400 bad input, 401 missing or wrong key,
404 unknown model or adapter, 503 queue full or no adapter slot, 500 an engine failure.
"""

from __future__ import annotations

from typing import Any

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    409: "ConflictError",
    413: "RequestTooLargeError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    """A request failed with ``status``; ``param`` names the request field at fault, if any."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param)


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    kind = _TYPES.get(status, "InternalServerError" if status >= 500 else "BadRequestError")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


def not_found(message: str, param: str | None = "model") -> APIError:
    return APIError(404, message, param)


def unavailable(message: str, retry_after_s: int = 1) -> APIError:
    return APIError(503, message, headers={"Retry-After": str(retry_after_s)})
