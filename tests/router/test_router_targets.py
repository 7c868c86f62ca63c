"""Server request builders, asserted field by field for vLLM, SGLang, LoRAX and TGI."""

from __future__ import annotations

import pytest

from router import AdapterMap, Decision, Reason, UnknownAdapterError, native_request, openai_request

ADAPTERS = AdapterMap(
    base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
    adapters={"law": "law-lora", "code": "code-lora"},
)
CHAT = {
    "model": "auto",
    "messages": [{"role": "user", "content": "Is this clause enforceable?"}],
    "max_tokens": 64,
    "temperature": 0.2,
    "top_p": 0.9,
    "stop": "\n\n",
    "stream": False,
}
LAW = Decision(label="law", reason=Reason.CONFIDENT)
BASE = Decision(label="base", reason=Reason.LOW_CONFIDENCE)


@pytest.mark.parametrize(
    ("target", "law_model", "base_model"),
    [
        ("vllm", "law-lora", "HuggingFaceTB/SmolLM2-135M-Instruct"),
        (
            "sglang",
            "HuggingFaceTB/SmolLM2-135M-Instruct:law-lora",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
        ("lorax", "law-lora", ""),
        ("tgi", "law-lora", "tgi"),
    ],
)
def test_openai_requests(target: str, law_model: str, base_model: str) -> None:
    for decision, model in ((LAW, law_model), (BASE, base_model)):
        req = openai_request(target, decision, CHAT, ADAPTERS)
        assert (req.method, req.path) == ("POST", "/v1/chat/completions")
        assert req.json == {**CHAT, "model": model}
    assert CHAT["model"] == "auto"  # the caller's request is not modified


def test_openai_request_deep_copies_messages() -> None:
    req = openai_request("vllm", LAW, CHAT, ADAPTERS)
    req.json["messages"][0]["content"] = "changed"
    assert CHAT["messages"][0]["content"] == "Is this clause enforceable?"


def test_sglang_native_generate() -> None:
    law = native_request("sglang", LAW, "<prompt>", ADAPTERS, CHAT)
    assert (law.method, law.path) == ("POST", "/generate")
    assert law.json == {
        "text": "<prompt>",
        "sampling_params": {
            "max_new_tokens": 64,
            "temperature": 0.2,
            "top_p": 0.9,
            "stop": ["\n\n"],
        },
        "lora_path": "law-lora",
    }
    base = native_request("sglang", "base", "<prompt>", ADAPTERS)
    assert base.json == {"text": "<prompt>", "sampling_params": {}, "lora_path": None}


@pytest.mark.parametrize("target", ["lorax", "tgi"])
def test_lorax_and_tgi_native_generate(target: str) -> None:
    law = native_request(target, LAW, "<prompt>", ADAPTERS, {"max_tokens": 8})
    assert law.path == "/generate"
    assert law.json == {
        "inputs": "<prompt>",
        "parameters": {"max_new_tokens": 8, "adapter_id": "law-lora"},
    }
    base = native_request(target, BASE, "<prompt>", ADAPTERS, {"max_tokens": 8})
    assert base.json == {"inputs": "<prompt>", "parameters": {"max_new_tokens": 8}}
    assert "adapter_id" not in base.json["parameters"]


def test_unknown_label_fails_loudly_instead_of_serving_base() -> None:
    with pytest.raises(UnknownAdapterError, match="no adapter for label 'medical'"):
        openai_request("vllm", "medical", CHAT, ADAPTERS)
    with pytest.raises(UnknownAdapterError):
        native_request("tgi", "medical", "p", ADAPTERS)


def test_unknown_target() -> None:
    with pytest.raises(ValueError, match="unknown server target"):
        openai_request("triton", LAW, CHAT, ADAPTERS)
    with pytest.raises(ValueError, match="OpenAI-compatible"):
        native_request("vllm", LAW, "p", ADAPTERS)
