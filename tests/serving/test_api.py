"""Every endpoint and mode over real HTTP with the official openai client."""

from __future__ import annotations

import httpx
import pytest

from tests.router.tests_router_helpers import QUESTIONS

MODES = ["base", "law", "code", "medical", "auto", "moe"]
ASK = [{"role": "user", "content": QUESTIONS["law"]}]


def test_models_lists_every_mode_and_adapter_vllm_style(client, server):
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == set(MODES)
    base_name = server.state.base_name
    assert (
        cards["base"].model_extra["root"] == base_name
        and cards["base"].model_extra["parent"] is None
    )
    for name in ("law", "code", "medical", "auto", "moe"):
        assert cards[name].model_extra["parent"] == base_name
    assert cards["law"].model_extra["root"] == "law"  # relative to the adapter root, not a path
    assert cards["moe"].model_extra["loralab"]["experts"] == ["law", "code", "medical"]


@pytest.mark.parametrize("model", MODES)
def test_chat_stream_equals_whole_answer_for_every_mode(client, model):
    kwargs = dict(model=model, messages=ASK, max_tokens=12, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    text = whole.choices[0].message.content
    assert whole.model == model and whole.object == "chat.completion"
    assert whole.choices[0].finish_reason in ("stop", "length")
    usage = whole.usage
    assert (
        usage.completion_tokens >= 1
        and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    )
    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].usage.completion_tokens == usage.completion_tokens
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[0].model_extra["route"]["model"] == whole.model_extra["route"]["model"]


def test_modes_answer_differently(client):
    """The random experts change the greedy tokens: a server that ignored `model` would fail."""
    answers = {}
    for model in ("base", "law", "code", "medical", "moe"):
        r = client.chat.completions.create(
            model=model,
            messages=ASK,
            max_tokens=8,
            temperature=0,
            extra_body={"return_token_ids": True},
        )
        answers[model] = tuple(r.choices[0].model_extra["token_ids"])
    assert len(set(answers.values())) == len(answers)


def test_auto_carries_the_router_decision_in_body_headers_and_stream(client):
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=ASK, max_tokens=4, temperature=0
    )
    body = raw.parse()
    route = body.model_extra["route"]
    assert route["label"] == "law" and route["model"] == "law" and route["reason"] == "confident"
    assert set(route["probs"]) == {"law", "code", "medical", "base"}
    assert abs(sum(route["probs"].values()) - 1) < 1e-4
    assert raw.headers["x-loralab-route-label"] == "law"
    assert raw.headers["x-loralab-route-reason"] == "confident"
    assert raw.headers["x-loralab-route-model-version"] == route["model_version"]
    first = next(
        iter(client.chat.completions.create(model="auto", messages=ASK, max_tokens=2, stream=True))
    )
    assert first.model_extra["route"]["label"] == "law"
    # auto answers exactly what the chosen adapter answers
    law = client.chat.completions.create(model="law", messages=ASK, max_tokens=8, temperature=0)
    auto = client.chat.completions.create(model="auto", messages=ASK, max_tokens=8, temperature=0)
    assert auto.choices[0].message.content == law.choices[0].message.content


def test_auto_routes_each_domain_and_abstains_to_base(client):
    for label, text in QUESTIONS.items():
        r = client.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": text}], max_tokens=1
        )
        assert r.model_extra["route"]["model"] == label
    empty = client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "   "}], max_tokens=1
    )
    assert empty.model_extra["route"] == {
        **empty.model_extra["route"],
        "model": "base",
        "reason": "empty_input",
    }


def test_completions_endpoint_stream_and_whole(client):
    whole = client.completions.create(
        model="code", prompt="def sort(", max_tokens=10, temperature=0
    )
    assert whole.object == "text_completion" and whole.usage.completion_tokens >= 1
    chunks = list(
        client.completions.create(
            model="code", prompt="def sort(", max_tokens=10, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text


def test_stop_strings_end_the_answer_and_are_not_returned(client):
    full = (
        client.completions.create(model="law", prompt="the contract", max_tokens=24, temperature=0)
        .choices[0]
        .text
    )
    assert len(full) > 4
    stop = full[2:4]
    cut = client.completions.create(
        model="law", prompt="the contract", max_tokens=24, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible_and_seeds_differ(client):
    def sample(seed):
        r = client.chat.completions.create(
            model="moe",
            messages=ASK,
            max_tokens=16,
            temperature=1.0,
            seed=seed,
            extra_body={"return_token_ids": True, "ignore_eos": True},
        )
        return r.choices[0].model_extra["token_ids"]

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_ignore_eos_gives_exactly_max_tokens(client):
    r = client.chat.completions.create(
        model="base", messages=ASK, max_tokens=20, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.usage.completion_tokens == 20 and r.choices[0].finish_reason == "length"


def test_gate_weights_stream_extension(client, server):
    slots = server.state.gate_slots
    blocks = 2  # the tiny Llama's decoder layers
    chunks = list(
        client.chat.completions.create(
            model="moe",
            messages=ASK,
            max_tokens=6,
            temperature=0,
            stream=True,
            extra_body={"return_gate_weights": True, "ignore_eos": True, "return_token_ids": True},
        )
    )
    assert chunks[0].model_extra["gate_slots"] == slots
    tokens = [c for c in chunks if c.choices and c.choices[0].model_extra.get("token_ids")]
    assert len(tokens) == 6
    for chunk in tokens:
        gate = chunk.choices[0].model_extra["gate_weights"]
        assert len(gate["layers"]) == blocks and all(len(b) == len(slots) for b in gate["layers"])
        assert abs(sum(gate["mean"]) - 1) < 1e-3  # a softmax over the slots
        assert sum(w > 0 for w in gate["mean"]) > 1  # the gate mixes, unlike a one-hot adapter
    law = client.chat.completions.create(
        model="law",
        messages=ASK,
        max_tokens=2,
        temperature=0,
        extra_body={"return_gate_weights": True},
    )
    for gate in law.choices[0].model_extra["gate_weights"]:
        assert gate["mean"] == [1.0, 0.0, 0.0] + [0.0] * (len(slots) - 3)
    plain = list(
        client.chat.completions.create(model="moe", messages=ASK, max_tokens=2, stream=True)
    )
    assert all("gate_weights" not in (c.choices[0].model_extra if c.choices else {}) for c in plain)


def test_base_answers_to_the_base_models_own_name(client, server):
    a = client.chat.completions.create(model="base", messages=ASK, max_tokens=6, temperature=0)
    b = client.chat.completions.create(
        model=server.state.base_name, messages=ASK, max_tokens=6, temperature=0
    )
    assert a.choices[0].message.content == b.choices[0].message.content


def test_health_and_metrics_per_model_and_adapter(client, server):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    client.chat.completions.create(model="auto", messages=ASK, max_tokens=2)
    client.chat.completions.create(model="moe", messages=ASK, max_tokens=2)
    text = httpx.get(f"{server.url}/metrics").text
    assert 'loralab_requests_total{adapter="law",model="auto",status="ok"}' in text
    assert 'loralab_requests_total{adapter="gate",model="moe",status="ok"}' in text
    assert (
        'loralab_time_to_first_token_seconds_bucket{adapter="gate",le="0.05",model="moe"}' in text
    )
    assert 'loralab_routing_decisions_total{label="law",reason="confident"}' in text
    assert 'loralab_batch_size_count{kind="decode"}' in text
    for name in (
        "loralab_queue_depth",
        "loralab_loaded_adapters 3.0",
        "loralab_adapter_evictions_total",
        "loralab_generation_tokens_total",
        "loralab_request_latency_seconds_bucket",
    ):
        assert name in text
