"""Request and response bodies in OpenAI's shapes (pydantic), plus loralab's documented extensions.

Extensions (all optional, off by default; the OpenAI Python client sends them with ``extra_body``):

- ``ignore_eos`` (bool, vLLM's name): keep generating past the end-of-sequence token up to
  ``max_tokens`` (fixed-length benchmarks).
- ``return_token_ids`` (bool, vLLM's name): the prompt's token ids (``prompt_token_ids``) and the
  generated ones (``choices[i].token_ids``, the end-of-sequence token included; per chunk when
  streaming).
- ``return_gate_weights`` (bool): with each generated token, send the expert weights that produced
  it, per decoder block and averaged (``choices[i].gate_weights`` in stream chunks, a list of them
  in a whole response; the slot names are in the top-level ``gate_slots``). For ``moe`` these are
  the trained gate's weights; other modes show their fixed weights (one-hot, or zeros for base).

Responses also carry ``route`` (``model="auto"``: the router's decision; other models: their fixed
routing) as a top-level field of the response and of the first stream chunk.

Unknown request fields are refused (400 naming the field), so a typo never silently changes an
answer; fields OpenAI defines that this server cannot honour accept only their neutral value.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = Field(None, max_length=256)

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Generation(_Strict):
    """The fields both endpoints share."""

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, description="Default: server.default_max_tokens")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 = greedy")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = Field(None, description="Up to 4 strings, not returned")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="Only 1")
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0, description="Not supported: only 0")
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0, description="Not supported: only 0")
    user: str | None = Field(None, max_length=256)
    ignore_eos: bool = Field(False, description="Extension (vLLM): generate max_tokens tokens")
    return_gate_weights: bool = Field(False, description="Extension: gate weights per token")
    return_token_ids: bool = Field(False, description="Extension (vLLM): prompt and output ids")

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Alias of max_tokens")


class CompletionRequest(_Generation):
    prompt: str | list[str] = Field(description="One prompt (a string, or a list of one string)")
    echo: bool = Field(False, description="Not supported: only false")


class LoadLoraRequest(_Strict):
    lora_name: str = Field(min_length=1, max_length=64)
    lora_path: str = Field(
        min_length=1, max_length=1024, description="Relative to the adapter root"
    )


class UnloadLoraRequest(_Strict):
    lora_name: str = Field(min_length=1, max_length=64)


class RouteInfo(BaseModel):
    """How a request was routed: for ``auto`` the router's decision, else the fixed choice."""

    model: str  # what served it: base, an adapter name, or moe
    label: str | None = None  # router label (auto only)
    reason: str | None = None
    probs: dict[str, float] = Field(default_factory=dict)
    margin: float | None = None
    predicted: str | None = None
    model_version: str | None = None
    latency_ms: float | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "loralab"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    loralab: dict[str, Any] = Field(default_factory=dict)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
    loralab: dict[str, Any] = Field(
        default_factory=dict,
        description="Extension: gate_slots, runtime_lora_updating, load_needs_key (the playground)",
    )


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorInfo
