"""The project's expert adapters served unchanged by a real vLLM, and vLLM's greedy output equal
to PEFT's (marker ``vllm``).

Parity: the same chat prompt gives the same prompt token ids on both sides, the same greedy tokens
(up to 8 new ones, fp32 on both sides) and each chosen token's log-probability within 1e-3 nats.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from loralab.serving.vllm_parity import peft_greedy, vllm_greedy
from tests.router.tests_router_helpers import QUESTIONS

pytestmark = pytest.mark.vllm

MAX_NEW_TOKENS = 8
LOGPROB_TOLERANCE = 1e-3  # nats; fp32 kernels differ in summation order only
PROMPTS = [QUESTIONS["law"], QUESTIONS["code"], QUESTIONS["medical"]]


@pytest.fixture(scope="module")
def peft_model(served_run: dict[str, Any]) -> tuple[Any, Any]:
    """All three experts on the saved base folder, loaded the project's way (verified first)."""
    from loralab.artifacts import load_expert
    from loralab.base_model import load_base_model

    base, tokenizer = load_base_model({"source": "hf", "name": str(served_run["model"])})
    return load_expert(base, served_run["adapters"], served_run["fingerprint"]).eval(), tokenizer


def test_models_lists_every_expert_on_its_base(vllm_server: Any, served_run: dict) -> None:
    r = httpx.get(f"{vllm_server.url}/v1/models", timeout=30)
    assert r.status_code == 200
    cards = {m["id"]: m for m in r.json()["data"]}
    assert set(cards) == {served_run["name"], "law", "code", "medical"}
    for domain, path in served_run["adapters"].items():
        assert cards[domain]["parent"] == served_run["name"]
        assert Path(cards[domain]["root"]) == path  # the project's folder itself, not a copy


@pytest.mark.parametrize("model", ["base", "law", "code", "medical"])
def test_greedy_tokens_equal_peft(
    vllm_server: Any, served_run: dict, peft_model: tuple[Any, Any], model: str
) -> None:
    served = served_run["name"] if model == "base" else model
    for text in PROMPTS:
        got, answer = vllm_greedy(vllm_server.url, served, text, MAX_NEW_TOKENS)
        want = peft_greedy(*peft_model, None if model == "base" else model, text, MAX_NEW_TOKENS)
        assert answer["model"] == served
        assert got.prompt_ids == want.prompt_ids
        assert got.ids == want.ids, f"{model}: {text!r}"
        assert len(got.ids) >= 1
        assert got.logprobs == pytest.approx(want.logprobs, abs=LOGPROB_TOLERANCE)


def test_each_expert_changes_the_output(vllm_server: Any, served_run: dict) -> None:
    """Guards the parity test: an adapter vLLM ignored would look like the base model."""

    def first_logprob(model: str) -> float:
        return vllm_greedy(vllm_server.url, model, QUESTIONS["law"], 1)[0].logprobs[0]

    base = first_logprob(served_run["name"])
    for domain in ("law", "code", "medical"):
        assert abs(first_logprob(domain) - base) > 10 * LOGPROB_TOLERANCE


def test_runtime_load_serves_each_adapter_unchanged(vllm_server: Any, served_run: dict) -> None:
    from loralab.artifacts import verify_adapter

    url = vllm_server.url
    for domain, path in served_run["adapters"].items():
        name = f"{domain}-runtime"
        r = httpx.post(
            f"{url}/v1/load_lora_adapter",
            json={"lora_name": name, "lora_path": str(path)},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        cards = {m["id"]: m for m in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]}
        assert cards[name]["parent"] == served_run["name"]
        for text in PROMPTS[:2]:
            runtime, _ = vllm_greedy(url, name, text, MAX_NEW_TOKENS)
            startup, _ = vllm_greedy(url, domain, text, MAX_NEW_TOKENS)
            assert runtime.ids == startup.ids
            assert runtime.logprobs == pytest.approx(startup.logprobs, abs=1e-5)
        r = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": name}, timeout=60)
        assert r.status_code == 200, r.text
        gone = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
            timeout=60,
        )
        assert gone.status_code == 404
        verify_adapter(path, served_run["fingerprint"])  # files untouched by serving


def test_runtime_load_of_a_missing_folder_is_refused(vllm_server: Any, tmp_path: Path) -> None:
    r = httpx.post(
        f"{vllm_server.url}/v1/load_lora_adapter",
        json={"lora_name": "ghost", "lora_path": str(tmp_path / "nothing")},
        timeout=60,
    )
    assert r.status_code in (400, 404)
    assert "ghost" in r.json()["error"]["message"]
