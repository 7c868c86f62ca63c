"""Does a served vLLM answer like the project's PEFT model? Greedy tokens and their log-probs,
per served model (base and each adapter) and prompt, from the same chat prompt."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROMPTS = (
    "Is a verbal lease for 3 years enforceable?",
    "Write a Python function that reverses a string.",
    "What are the symptoms of iron deficiency anemia?",
)


@dataclass(frozen=True)
class Greedy:
    """A greedy continuation: the prompt's token ids, the new ids and each one's log-probability."""

    prompt_ids: list[int]
    ids: list[int]
    logprobs: list[float]


def peft_greedy(
    model: Any, tokenizer: Any, adapter: str | None, text: str, max_new_tokens: int
) -> Greedy:
    """Greedy decoding with PEFT: ``adapter`` active, or every adapter off for None."""
    import torch

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids  # (1, T)
    if adapter is not None:
        model.set_adapter(adapter)
    off = model.disable_adapter() if adapter is None else contextlib.nullcontext()
    with torch.no_grad(), off:
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=tokenizer.pad_token_id,
        )
    new = out.sequences[0, ids.shape[1] :].tolist()
    # out.logits: one (1, vocab) tensor per new token, before any logits processor
    logprobs = [
        float(torch.log_softmax(step[0].float(), dim=-1)[tok])
        for step, tok in zip(out.logits, new, strict=True)
    ]
    return Greedy(ids[0].tolist(), new, logprobs)


def vllm_greedy(
    url: str, model: str, text: str, max_new_tokens: int, timeout: float = 120.0
) -> tuple[Greedy, dict[str, Any]]:
    """Greedy decoding on a vLLM server (``temperature: 0``; token ids and log-probs returned)."""
    import httpx

    body = {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_new_tokens,
        "temperature": 0,
        "logprobs": True,
        "return_token_ids": True,
    }
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=timeout)
    if r.status_code != 200:
        raise RuntimeError(f"{url}/v1/chat/completions: HTTP {r.status_code}: {r.text[:300]}")
    answer = r.json()
    choice = answer["choices"][0]
    logprobs = [t["logprob"] for t in choice["logprobs"]["content"]]
    return Greedy(answer["prompt_token_ids"], choice["token_ids"], logprobs), answer


def compare(
    url: str,
    peft_model: Any,
    tokenizer: Any,
    served: Mapping[str | None, str],
    prompts: Sequence[str] = PROMPTS,
    max_new_tokens: int = 16,
) -> dict[str, Any]:
    """Per (served model, prompt): equal prompt ids, equal greedy ids, index of the first differing
    token, largest log-prob difference over the common prefix. ``served`` maps the PEFT adapter
    name (None = base) to the served model name."""
    rows: list[dict[str, Any]] = []
    for adapter, name in served.items():
        for text in prompts:
            want = peft_greedy(peft_model, tokenizer, adapter, text, max_new_tokens)
            got, _ = vllm_greedy(url, name, text, max_new_tokens)
            first_diff = next(
                (i for i, (a, b) in enumerate(zip(got.ids, want.ids, strict=False)) if a != b),
                min(len(got.ids), len(want.ids)),
            )
            diffs = [abs(a - b) for a, b in zip(got.logprobs, want.logprobs, strict=False)][
                :first_diff
            ]
            rows.append(
                {
                    "model": name,
                    "prompt": text,
                    "prompt_ids_equal": got.prompt_ids == want.prompt_ids,
                    "tokens_equal": got.ids == want.ids,
                    "first_diff": first_diff,
                    "max_logprob_diff": max(diffs, default=0.0),
                }
            )
    return {
        "tokens_equal": sum(r["tokens_equal"] for r in rows),
        "of": len(rows),
        "max_logprob_diff": max(r["max_logprob_diff"] for r in rows),
        "rows": rows,
    }


def check_run(
    run_dir: str | Path,
    model: str | Path | None = None,
    prompts: Sequence[str] = PROMPTS,
    max_new_tokens: int = 16,
    timeout_s: float = 600.0,
    **settings: Any,
) -> dict[str, Any]:
    """Serve a run's experts with vLLM (``settings``: ``ServerConfig`` fields, e.g. ``dtype``),
    load the same experts with PEFT (float32, CPU), and ``compare`` the two."""
    from loralab.artifacts import load_expert
    from loralab.base_model import load_base_model, weights_fingerprint
    from loralab.serving.vllm_cpu import config_for_run, start_server

    cfg = config_for_run(run_dir, model, **settings)  # verifies hashes and the base fingerprint
    base, tokenizer = load_base_model({"source": "hf", "name": str(cfg.model), "device": "cpu"})
    adapters = {n: str(p) for n, p in cfg.adapters.items()}
    peft_model = load_expert(base, adapters, weights_fingerprint(base)).eval()
    served: dict[str | None, str] = {None: cfg.served_model_name}
    served.update({name: name for name in cfg.adapters})
    start = time.perf_counter()
    with start_server(cfg, timeout_s=timeout_s) as server:
        startup_s = time.perf_counter() - start
        report = compare(server.url, peft_model, tokenizer, served, prompts, max_new_tokens)
    return {"dtype": cfg.dtype, "startup_s": round(startup_s, 1), **report}
