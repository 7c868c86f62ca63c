"""Bad input gets a clear error in the one body shape, and the server keeps serving; schemathesis
finds no 5xx in the server's own OpenAPI schema; missing or altered runs stop the start-up."""

from __future__ import annotations

import shutil

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.serving.conftest import serve_config

MESSAGES = [{"role": "user", "content": "hi"}]


def chat(server, **body):
    return httpx.post(
        f"{server.url}/v1/chat/completions", json={"model": "law", "messages": MESSAGES, **body}
    )


def error_of(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    return error


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"model": "lw"}, "model", "does not exist"),
        ({"messages": []}, "messages", "at least 1"),
        ({"messages": None}, "messages", "valid list"),
        ({"temperature": "hot"}, "temperature", "valid number"),
        ({"temperature": 3}, "temperature", "less than or equal to 2"),
        ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"max_tokens": 129}, "max_tokens", "over this server's cap of 128"),
        (
            {"max_tokens": 120, "messages": [{"role": "user", "content": "law " * 40}]},
            "max_tokens",
            "maximum context length",
        ),
        (
            {"messages": [{"role": "user", "content": "law " * 300}]},
            "messages",
            "maximum context length is 256",
        ),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role", "Input should be"),
        ({"n": 2}, "n", "less than or equal to 1"),
        ({"logit_bias": {"1": 5}}, "logit_bias", "Extra inputs are not permitted"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        ({"top_p": 0}, "top_p", "greater than 0"),
    ],
)
def test_bad_chat_requests_get_400_or_404_naming_the_field(server, body, param, words):
    r = chat(server, **body)
    error = error_of(r, 404 if param == "model" else 400)
    assert error["param"] == param and words in error["message"], error


def test_missing_field_malformed_json_and_wrong_body(server):
    url = f"{server.url}/v1/chat/completions"
    error = error_of(httpx.post(url, json={"messages": MESSAGES}), 400)
    assert error["param"] == "model" and "required" in error["message"]
    error = error_of(
        httpx.post(url, content=b'{"model": "law",', headers={"content-type": "application/json"}),
        400,
    )
    assert "not valid JSON" in error["message"]
    error_of(httpx.post(url, json=["not", "an", "object"]), 400)
    error_of(httpx.post(f"{server.url}/v1/completions", json={"model": "law", "prompt": ""}), 400)
    error_of(
        httpx.post(f"{server.url}/v1/completions", json={"model": "law", "prompt": ["a", "b"]}), 400
    )
    error_of(httpx.get(f"{server.url}/v1/nothing"), 404)
    error_of(httpx.get(url), 405)
    assert chat(server).status_code == 200  # nothing lost


def test_a_run_without_gate_or_router_says_so_and_serves_the_rest(
    start_server, served_run, tmp_path
):
    run = tmp_path / "experts_only"
    shutil.copytree(served_run["dir"] / "experts", run / "experts")
    server = start_server(run_dir=run)
    for model, words in (("moe", "no trained gate"), ("auto", "no router")):
        error = error_of(chat(server, model=model), 404)
        assert words in error["message"]
    assert chat(server, model="code").status_code == 200


def test_start_up_refuses_a_missing_run_or_an_altered_expert(served_run, tmp_path):
    from loralab.artifacts import AdapterVerificationError
    from loralab.serving.loading import build_state

    with pytest.raises(FileNotFoundError, match=r"run_pipeline\.py"):
        build_state(serve_config(tmp_path / "nothing", tmp_path, ["train_if_missing=false"]))
    run = tmp_path / "altered"
    shutil.copytree(served_run["dir"], run)
    weights = run / "experts" / "adapters" / "code" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    with pytest.raises(AdapterVerificationError, match="sha256"):
        build_state(serve_config(run, tmp_path))
    with pytest.raises(ValueError, match="loopback"):
        build_state(serve_config(served_run["dir"], tmp_path, ["server.host=0.0.0.0"]))


def test_schemathesis_finds_no_server_error(start_server):
    """Every operation of /openapi.json, 25 generated requests each, over real HTTP."""
    from hypothesis import given

    fuzzed = start_server()  # its own server: fuzzing may load adapters
    api = schemathesis.openapi.from_url(f"{fuzzed.url}/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) == 7
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None
        )
        def no_server_error(case):
            response = case.call(timeout=60)
            assert response.status_code < 500, (
                case.method,
                case.path,
                case.body,
                response.text[:300],
            )
            if response.status_code >= 400:
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}

        no_server_error()
