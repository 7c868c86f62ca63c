"""Turn a routing decision plus a request into the exact request a multi-LoRA server expects.

| server | OpenAI-compatible ``model`` (expert / base)  | native endpoint: adapter field (base)        |
|--------|----------------------------------------------|----------------------------------------------|
| vLLM   | adapter name / base model name               | (none: vLLM is OpenAI-only here)             |
| SGLang | ``"<base>:<adapter>"`` / ``"<base>"``         | ``/generate`` ``lora_path`` (``null``)        |
| LoRAX  | adapter id / ``""``                          | ``/generate`` ``parameters.adapter_id`` (omitted) |
| TGI    | adapter id / ``"tgi"``                        | ``/generate`` ``parameters.adapter_id`` (omitted) |

A label with no adapter in the mapping raises ``UnknownAdapterError`` instead of silently serving
the base model.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from router.decision import Decision

TARGETS = ("vllm", "sglang", "lorax", "tgi")
CHAT_PATH = "/v1/chat/completions"
GENERATE_PATH = "/generate"
# OpenAI sampling fields -> native names (SGLang ``sampling_params``, TGI / LoRAX ``parameters``).
_SAMPLING = {
    "max_tokens": "max_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "stop": "stop",
}


class UnknownAdapterError(KeyError):
    """A decision names a label that has no adapter in the mapping."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class AdapterMap:
    """Which served model answers each label: ``adapters`` maps expert labels to adapter names;
    ``base_label`` (and only it) goes to ``base_model``."""

    base_model: str
    adapters: Mapping[str, str] = field(default_factory=dict)
    base_label: str = "base"

    def adapter_for(self, label: str) -> str | None:
        """The adapter name for ``label``; None for the base label."""
        if label == self.base_label:
            return None
        if label not in self.adapters:
            raise UnknownAdapterError(
                f"no adapter for label {label!r}; mapping has {sorted(self.adapters)} (+ {self.base_label!r})"
            )
        return self.adapters[label]


@dataclass(frozen=True)
class ServerRequest:
    """An HTTP request body for a server: POST ``json`` to ``path``."""

    path: str
    json: dict[str, Any]
    method: str = "POST"


def _label(decision: Decision | str) -> str:
    return decision.label if isinstance(decision, Decision) else decision


def openai_model(target: str, label: str, adapters: AdapterMap) -> str:
    """The OpenAI ``model`` field that selects ``label`` on ``target``."""
    adapter = adapters.adapter_for(label)
    if target == "vllm":
        return adapter if adapter is not None else adapters.base_model
    if target == "sglang":
        return f"{adapters.base_model}:{adapter}" if adapter is not None else adapters.base_model
    if target == "lorax":
        return adapter if adapter is not None else ""
    if target == "tgi":
        return adapter if adapter is not None else "tgi"
    raise ValueError(f"unknown server target {target!r}; expected one of {TARGETS}")


def openai_request(
    target: str, decision: Decision | str, request: Mapping[str, Any], adapters: AdapterMap
) -> ServerRequest:
    """The OpenAI chat request with ``model`` set for the decided label; other fields unchanged."""
    body = copy.deepcopy(dict(request))
    body["model"] = openai_model(target, _label(decision), adapters)
    return ServerRequest(CHAT_PATH, body)


def _native_params(target: str, request: Mapping[str, Any] | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for src, dst in _SAMPLING.items():
        if request and src in request and request[src] is not None:
            value = request[src]
            params[dst] = (
                [value] if dst == "stop" and isinstance(value, str) else copy.deepcopy(value)
            )
    if target == "tgi":
        # TGI's /generate refuses temperature <= 0 and top_p >= 1 (router/src/validation.rs);
        # OpenAI's 0 (greedy) and 1 (no nucleus filtering) are what TGI does without the field.
        if params.get("temperature") == 0:
            del params["temperature"]
        if params.get("top_p", 0) >= 1:
            del params["top_p"]
    return params


def native_request(
    target: str,
    decision: Decision | str,
    prompt: str,
    adapters: AdapterMap,
    request: Mapping[str, Any] | None = None,
) -> ServerRequest:
    """The native ``/generate`` request for an already chat-templated ``prompt``.

    Sampling fields of an OpenAI ``request`` (``max_tokens``, ``temperature``, ``top_p``, ``stop``)
    are carried over under the server's names (for TGI, ``temperature=0`` and ``top_p=1``, which
    its ``/generate`` refuses, are left out: they are its defaults).
    """
    adapter = adapters.adapter_for(_label(decision))
    params = _native_params(target, request)
    if target == "sglang":
        return ServerRequest(
            GENERATE_PATH, {"text": prompt, "sampling_params": params, "lora_path": adapter}
        )
    if target in ("lorax", "tgi"):
        if adapter is not None:
            params["adapter_id"] = adapter
        return ServerRequest(GENERATE_PATH, {"inputs": prompt, "parameters": params})
    if target == "vllm":
        raise ValueError("vLLM is served through its OpenAI-compatible API: use openai_request")
    raise ValueError(f"unknown server target {target!r}; expected one of {TARGETS}")
