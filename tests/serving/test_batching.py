"""Mixed batches: each request's tokens alone == inside a batch of every mode == the reference
implementation (PEFT for an adapter, MoELoraModel.generate for moe, the plain model for base);
cancellation frees the row; a failing request fails alone; a full queue answers 503."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from tests.router.tests_router_helpers import QUESTIONS
from tests.serving.serving_helpers import engine_held, wait_for

MIX = [
    ("base", QUESTIONS["base"]),
    ("law", QUESTIONS["law"]),
    ("code", QUESTIONS["code"]),
    ("medical", QUESTIONS["medical"]),
    ("auto", QUESTIONS["code"]),
    ("moe", QUESTIONS["medical"]),
    ("moe", "hi"),
    ("law", "the tenant " * 20),
]


def ask(url, model, text, max_tokens=10, **extra):
    body = {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "return_token_ids": True,
        **extra,
    }
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    return r


def ids(response):
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["token_ids"]


def together(url, engine, requests, **extra):
    """Send all requests while the engine is held, so they are prefilled and decoded as one batch."""
    with ThreadPoolExecutor(len(requests)) as pool, engine_held(engine):
        futures = [pool.submit(ask, url, m, t, **extra) for m, t in requests]
        wait_for(lambda: engine.stats()["waiting"] == len(requests))
    return [f.result() for f in futures]


@pytest.fixture
def step_sizes(server, monkeypatch):
    sizes = []
    original = server.state.engine.on_step
    monkeypatch.setattr(
        server.state.engine, "on_step", lambda kind, n: (sizes.append((kind, n)), original(kind, n))
    )
    return sizes


def test_mixed_batch_equals_each_request_alone(server, step_sizes):
    alone = [ids(ask(server.url, m, t)) for m, t in MIX]
    step_sizes.clear()
    batched = [ids(r) for r in together(server.url, server.state.engine, MIX)]
    assert ("prefill", len(MIX)) in step_sizes  # one forward held every mode
    assert batched == alone


def test_requests_joining_a_running_batch_equal_alone(server):
    engine = server.state.engine
    long = ("code", QUESTIONS["law"])
    alone_long = ids(ask(server.url, *long, max_tokens=40, ignore_eos=True))
    alone = [ids(ask(server.url, m, t)) for m, t in MIX[:5]]
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(ask, server.url, *long, max_tokens=40, ignore_eos=True)
        wait_for(lambda: engine.stats()["running"] == 1)
        time.sleep(0.05)  # some decoding steps: the newcomers' cache is shorter or longer
        later = [pool.submit(ask, server.url, m, t) for m, t in MIX[:5]]
        assert ids(first.result()) == alone_long
        assert [ids(f.result()) for f in later] == alone


def test_seeded_sampling_alone_equals_in_batch(server):
    mix = MIX[:6]
    extra = {"temperature": 0.9, "seed": 3, "ignore_eos": True}
    alone = [ids(ask(server.url, m, t, **extra)) for m, t in mix]
    batched = [ids(r) for r in together(server.url, server.state.engine, mix, **extra)]
    assert batched == alone


def test_each_mode_equals_its_reference_implementation(server, served_run):
    from peft import PeftModel

    from loralab.base_model import load_base_model
    from moelora import load_moelora

    cfg = served_run["cfg"]

    def fresh_base():
        return load_base_model(cfg.base_model, cfg.paths.cache_dir, device="cpu")

    def greedy(model, prompt, n):
        x = torch.tensor([prompt])
        out = model.generate(
            input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False
        )
        return out[0, x.shape[1] :].tolist()

    responses = together(server.url, server.state.engine, MIX)
    for (model_name, _), response in zip(MIX, responses, strict=True):
        body = response.json()
        prompt, got = body["prompt_token_ids"], body["choices"][0]["token_ids"]
        served = body["route"]["model"]
        base, _ = fresh_base()
        if served == "base":
            reference = base
        elif served == "moe":
            reference = load_moelora(base, served_run["dir"] / "moelora" / "moelora")
        else:
            reference = PeftModel.from_pretrained(base, str(served_run["adapters"][served]))
        assert got == greedy(reference.eval(), prompt, 10), (model_name, served)


def test_disconnects_free_the_row(server, monkeypatch):
    engine = server.state.engine
    original = engine.on_step
    monkeypatch.setattr(engine, "on_step", lambda kind, n: (time.sleep(0.05), original(kind, n)))
    body = {
        "model": "medical",
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 100,
        "ignore_eos": True,
        "stream": True,
    }
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r,
    ):
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        assert engine.stats()["running"] == 1
    start = time.monotonic()
    wait_for(lambda: engine.stats()["running"] == 0, timeout=3)  # 100 tokens take > 5 s
    assert time.monotonic() - start < 3
    # a whole-answer request whose client gives up is cancelled too
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server.url}/v1/chat/completions", json={**body, "stream": False}, timeout=0.5)
    wait_for(lambda: engine.stats()["running"] == 0, timeout=4)
    text = httpx.get(f"{server.url}/metrics").text
    assert (
        'loralab_requests_total{adapter="medical",model="medical",status="cancelled"} 2.0' in text
    )


def test_a_failing_request_fails_alone(server, monkeypatch):
    tokenizer = server.state.tokenizer
    template = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    used = {i for _, t in MIX for i in tokenizer(template + t)["input_ids"]}
    poison_text = "QZXJ{~}"
    poison = next(i for i in tokenizer(poison_text)["input_ids"] if i not in used)
    base_model = server.state.model.base_model
    forward = base_model.forward

    def broken(*args, **kwargs):
        x = kwargs.get("input_ids")
        if x is not None and x.shape[1] > 1 and bool((x == poison).any()):
            raise RuntimeError("poisoned prompt")
        return forward(*args, **kwargs)

    alone = [ids(ask(server.url, m, t)) for m, t in MIX]
    monkeypatch.setattr(base_model, "forward", broken)
    responses = together(server.url, server.state.engine, [*MIX, ("law", poison_text)])
    assert [ids(r) for r in responses[:-1]] == alone
    failed = responses[-1]
    assert failed.status_code == 500
    assert "poisoned prompt" in failed.json()["error"]["message"]
    monkeypatch.undo()
    assert ids(ask(server.url, "law", poison_text)) != []  # and the server keeps serving


def test_full_queue_answers_503_and_keeps_no_more(start_server):
    small = start_server(["server.max_batch_size=1", "server.max_queue=1"])
    engine = small.state.engine
    with ThreadPoolExecutor(1) as pool:
        with engine_held(engine):
            first = pool.submit(ask, small.url, "law", "hi")
            wait_for(lambda: engine.stats()["waiting"] == 1)
            rejected = ask(small.url, "code", "hi")
        assert rejected.status_code == 503
        assert rejected.json()["error"]["type"] == "ServiceUnavailableError"
        assert "queue is full" in rejected.json()["error"]["message"]
        assert first.result().status_code == 200
