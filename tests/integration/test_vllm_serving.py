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

from tests.router.tests_router_helpers import QUESTIONS

pytestmark = pytest.mark.vllm

MAX_NEW_TOKENS = 8
LOGPROB_TOLERANCE = 1e-3  # nats; fp32 kernels differ in summation order only
PROMPTS = [QUESTIONS["law"], QUESTIONS["code"], QUESTIONS["medical"]]


def _vllm_greedy(url: str, model: str, text: str) -> dict[str, Any]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": MAX_NEW_TOKENS,
        "temperature": 0,
        "logprobs": True,
        "return_token_ids": True,
    }
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def peft_model(served_run: dict[str, Any]) -> tuple[Any, Any]:
    """All three experts on the saved base folder, loaded the project's way (verified first)."""
    from loralab.artifacts import load_expert
    from loralab.base_model import load_base_model

    base, tokenizer = load_base_model({"source": "hf", "name": str(served_run["model"])})
    return load_expert(base, served_run["adapters"], served_run["fingerprint"]).eval(), tokenizer


def _peft_greedy(peft_model: tuple[Any, Any], adapter: str | None, text: str) -> dict[str, Any]:
    import contextlib

    import torch

    model, tokenizer = peft_model
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids  # (1, T)
    if adapter is not None:
        model.set_adapter(adapter)
    with torch.no_grad(), model.disable_adapter() if adapter is None else contextlib.nullcontext():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=tokenizer.pad_token_id,
        )
    new = out.sequences[0, ids.shape[1] :].tolist()
    logprobs = [
        float(torch.log_softmax(step[0].float(), -1)[tok])
        for step, tok in zip(out.logits, new, strict=False)
    ]
    return {"prompt_ids": ids[0].tolist(), "ids": new, "logprobs": logprobs}


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
        got = _vllm_greedy(vllm_server.url, served, text)
        want = _peft_greedy(peft_model, None if model == "base" else model, text)
        choice = got["choices"][0]
        assert got["model"] == served
        assert got["prompt_token_ids"] == want["prompt_ids"]
        assert choice["token_ids"] == want["ids"], f"{model}: {text!r}"
        vllm_logprobs = [t["logprob"] for t in choice["logprobs"]["content"]]
        assert len(vllm_logprobs) == len(want["logprobs"])
        assert vllm_logprobs == pytest.approx(want["logprobs"], abs=LOGPROB_TOLERANCE)


def test_each_expert_changes_the_output(vllm_server: Any, served_run: dict) -> None:
    """Guards the parity test: an adapter vLLM ignored would look like the base model."""

    def first_logprob(model: str) -> float:
        out = _vllm_greedy(vllm_server.url, model, QUESTIONS["law"])
        return out["choices"][0]["logprobs"]["content"][0]["logprob"]

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
            runtime = _vllm_greedy(url, name, text)["choices"][0]
            startup = _vllm_greedy(url, domain, text)["choices"][0]
            assert runtime["token_ids"] == startup["token_ids"]
            assert [t["logprob"] for t in runtime["logprobs"]["content"]] == pytest.approx(
                [t["logprob"] for t in startup["logprobs"]["content"]], abs=1e-5
            )
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
