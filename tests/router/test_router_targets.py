"""Server request builders, checked against each server's own documented request schema.

``server_schemas/`` holds one JSON Schema per server endpoint, written from that server's OpenAPI
document or request model (the source file and commit are named in each schema's ``$comment``).
Every request is validated against it, and the adapter must sit in the field the server's
documentation names for it; the exact values checked are the documented conventions.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router import AdapterMap, Decision, Reason, UnknownAdapterError, native_request, openai_request

SCHEMAS = Path(__file__).parent / "server_schemas"
BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
ADAPTERS = AdapterMap(base_model=BASE_MODEL, adapters={"law": "law-lora", "code": "code-lora"})
# An OpenAI chat request every server's chat schema accepts (TGI and LoRAX take `stop` as a list).
CHAT = {
    "model": "auto",
    "messages": [{"role": "user", "content": "Is this clause enforceable?"}],
    "max_tokens": 64,
    "temperature": 0.2,
    "top_p": 0.9,
    "stop": ["\n\n"],
    "stream": False,
}
LAW = Decision(label="law", reason=Reason.CONFIDENT)
BASE = Decision(label="base", reason=Reason.LOW_CONFIDENCE)


@cache
def _validator(name: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMAS / f"{name}.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _validate(name: str, body: dict[str, Any]) -> None:
    errors = [f"{list(e.path)}: {e.message}" for e in _validator(name).iter_errors(body)]
    assert not errors, f"{name} rejects {body}: {errors}"


@pytest.mark.parametrize("target", ["vllm", "sglang", "lorax", "tgi"])
def test_openai_requests_validate_and_name_the_adapter_in_model(target: str) -> None:
    law = openai_request(target, LAW, CHAT, ADAPTERS)
    base = openai_request(target, BASE, CHAT, ADAPTERS)
    for req in (law, base):
        assert (req.method, req.path) == ("POST", "/v1/chat/completions")
        _validate(f"{target}_chat_completions", req.json)
        assert {k: v for k, v in req.json.items() if k != "model"} == {
            k: v for k, v in CHAT.items() if k != "model"
        }
    assert CHAT["model"] == "auto"  # the caller's request is not modified
    # The documented `model` values (sources in server_schemas/<target>_chat_completions.json):
    # vLLM: the --lora-modules name, or the base model's name as /v1/models lists it;
    # SGLang: "base-model:adapter-name"; LoRAX: the adapter id, "" for the base model;
    # TGI: the adapter id, "tgi" for the base model.
    expected = {
        "vllm": ("law-lora", BASE_MODEL),
        "sglang": (f"{BASE_MODEL}:law-lora", BASE_MODEL),
        "lorax": ("law-lora", ""),
        "tgi": ("law-lora", "tgi"),
    }[target]
    assert (law.json["model"], base.json["model"]) == expected


def test_openai_request_deep_copies_messages() -> None:
    req = openai_request("vllm", LAW, CHAT, ADAPTERS)
    req.json["messages"][0]["content"] = "changed"
    assert CHAT["messages"][0]["content"] == "Is this clause enforceable?"


def test_sglang_native_generate_passes_the_adapter_as_lora_path() -> None:
    law = native_request("sglang", LAW, "<prompt>", ADAPTERS, {**CHAT, "stop": "\n\n"})
    base = native_request("sglang", "base", "<prompt>", ADAPTERS)
    for req in (law, base):
        assert (req.method, req.path) == ("POST", "/generate")
        _validate("sglang_generate", req.json)
        assert req.json["text"] == "<prompt>"
    assert law.json["lora_path"] == "law-lora"
    assert base.json.get("lora_path") is None  # None = the base model (SGLang's LoRA docs)
    # OpenAI's sampling fields under SGLang's names, with the caller's values
    params = law.json["sampling_params"]
    assert (params["max_new_tokens"], params["temperature"], params["top_p"]) == (64, 0.2, 0.9)
    assert params["stop"] in ("\n\n", ["\n\n"])


@pytest.mark.parametrize("target", ["lorax", "tgi"])
def test_lorax_and_tgi_native_generate_pass_the_adapter_as_parameters_adapter_id(
    target: str,
) -> None:
    law = native_request(target, LAW, "<prompt>", ADAPTERS, {**CHAT, "stop": "\n\n"})
    base = native_request(target, BASE, "<prompt>", ADAPTERS, {"max_tokens": 8})
    for req in (law, base):
        assert (req.method, req.path) == ("POST", "/generate")
        _validate(f"{target}_generate", req.json)
        assert req.json["inputs"] == "<prompt>"
    assert law.json["parameters"]["adapter_id"] == "law-lora"
    assert base.json["parameters"].get("adapter_id") is None  # absent / null = the base model
    params = law.json["parameters"]
    assert (params["max_new_tokens"], params["temperature"], params["top_p"]) == (64, 0.2, 0.9)
    assert params["stop"] == ["\n\n"]  # the servers take a list, OpenAI also a single string
    assert base.json["parameters"]["max_new_tokens"] == 8


def test_openai_greedy_and_full_nucleus_reach_tgi_as_its_defaults() -> None:
    greedy = {"temperature": 0.0, "top_p": 1.0, "max_tokens": 8}
    tgi = native_request("tgi", LAW, "<prompt>", ADAPTERS, greedy)
    _validate("tgi_generate", tgi.json)  # TGI refuses temperature 0 and top_p 1 ...
    assert tgi.json["parameters"] == {"max_new_tokens": 8, "adapter_id": "law-lora"}  # ... absent
    lorax = native_request("lorax", LAW, "<prompt>", ADAPTERS, greedy)
    _validate("lorax_generate", lorax.json)  # LoRAX accepts both as they are
    assert (lorax.json["parameters"]["temperature"], lorax.json["parameters"]["top_p"]) == (0, 1)


# OpenAI's documented sampling fields (openai-python CompletionCreateParams): temperature "between
# 0 and 2", top_p the nucleus mass (0, 1], stop "up to 4 sequences" (a string or a list).
openai_sampling = st.fixed_dictionaries(
    {},
    optional={
        "max_tokens": st.integers(1, 4096),
        "temperature": st.sampled_from([0.0, 0.7, 1.0, 2.0]) | st.floats(0.0, 2.0),
        "top_p": st.sampled_from([1.0, 0.95]) | st.floats(0.0, 1.0, exclude_min=True),
        "stop": st.text(min_size=1, max_size=4)
        | st.lists(st.text(min_size=1, max_size=4), max_size=4),
    },
)


@settings(max_examples=200, deadline=None)
@given(
    sampling=openai_sampling,
    target=st.sampled_from(["sglang", "lorax", "tgi"]),
    label=st.sampled_from(["law", "code", "base"]),
)
def test_any_openai_sampling_gives_a_native_request_the_server_accepts(
    sampling: dict[str, Any], target: str, label: str
) -> None:
    req = native_request(target, label, "<prompt>", ADAPTERS, sampling)
    _validate(f"{target}_generate", req.json)
    adapter = (
        req.json.get("lora_path")
        if target == "sglang"
        else req.json["parameters"].get("adapter_id")
    )
    assert adapter == ADAPTERS.adapters.get(label)


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
