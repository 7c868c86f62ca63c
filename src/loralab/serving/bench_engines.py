"""The engine decision, measured: transformers' continuous batching vs loralab's BatchEngine.

Same prompts (chat-templated test-split instructions), same number of requests submitted at once
(``bench.engine_concurrency``, e.g. 8 and 32), greedy, ``max_tokens`` new tokens each, end of
sequence ignored, in this process (no HTTP):

- ``transformers_cb``: ``model.generate_batch`` (``ContinuousBatchingManager``, paged attention,
  SDPA on CPU) on the plain base model;
- ``loralab_base``: ``BatchEngine`` over the ``MoELoraModel`` holding the run's experts, every
  row routed to the base model (zero weights: the expert matmuls still run);
- ``loralab_mixed``: the same engine, rows round robin over base, each expert and the gate.

Each reports generated tokens per second (wall clock) and whether every request's tokens equal
the same request decoded alone by ``generate`` (first ``check`` requests).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from loralab.serving.bench import bench_prompts
from loralab.serving.decoding import SamplingParams
from loralab.serving.engine import BatchEngine, EngineConfig, EngineRequest, TokenEvent
from loralab.serving.loading import build_model


def _chat_ids(tokenizer: Any, prompts: list[str]) -> list[list[int]]:
    out = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        out.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return out


def _alone(model: Any, ids: list[int], max_tokens: int, **kwargs: Any) -> list[int]:
    x = torch.tensor([ids])
    out = model.generate(
        input_ids=x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=max_tokens,
        do_sample=False,
        eos_token_id=-1,  # never stops early, like ignore_eos (and without masking that token)
        **kwargs,
    )
    return out[0, x.shape[1] :].tolist()


def run_transformers_cb(
    model: Any, prompts: list[list[int]], max_tokens: int
) -> tuple[float, list[list[int]]]:
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=-1)
    start = time.perf_counter()
    out = model.generate_batch(
        prompts, generation_config=config, max_new_tokens=max_tokens, warmup=False
    )
    wall = time.perf_counter() - start
    results = list(out.values())  # in input order
    return wall, [list(r.generated_tokens)[:max_tokens] for r in results]


def run_engine(
    engine: BatchEngine, prompts: list[list[int]], choices: list[Any], max_tokens: int
) -> tuple[float, list[list[int]]]:
    tokens: list[list[int]] = [[] for _ in prompts]
    done = threading.Semaphore(0)

    def sink_for(i: int) -> Any:
        def sink(event: Any) -> None:
            if isinstance(event, TokenEvent):
                tokens[i].append(event.token_id)
            else:
                done.release()

        return sink

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    for i, (ids, choice) in enumerate(zip(prompts, choices, strict=True)):
        engine.submit(EngineRequest(ids, choice, params, sink_for(i), str(i)))
    for _ in prompts:
        done.acquire()
    return time.perf_counter() - start, tokens


def compare_engines(cfg: DictConfig) -> dict[str, Any]:
    from loralab.base_model import load_base_model, weights_fingerprint
    from moelora import GATE, RowRouting

    b = cfg.bench
    max_tokens, check = int(b.max_tokens), int(b.engine_check)
    base, tokenizer = load_base_model(cfg.base_model, cfg.paths.cache_dir)
    prompts_text = bench_prompts(cfg.data, int(b.prompts_per_domain), int(b.max_prompt_chars))
    result: dict[str, Any] = {"max_tokens": max_tokens, "threads": torch.get_num_threads()}
    for n in [int(c) for c in b.engine_concurrency]:
        ids = _chat_ids(tokenizer, [prompts_text[i % len(prompts_text)] for i in range(n)])
        row: dict[str, Any] = {"prompt_tokens": sum(map(len, ids))}
        wall, cb = run_transformers_cb(base, ids, max_tokens)
        row["transformers_cb_tokens_per_s"] = round(n * max_tokens / wall, 2)
        row["transformers_cb_equal_alone"] = sum(
            cb[i] == _alone(base, ids[i], max_tokens) for i in range(min(check, n))
        )
        result[str(n)] = row
    model, has_gate = build_model(base, Path(str(cfg.run_dir)), weights_fingerprint(base))
    gate: list[Any] = [GATE] if has_gate else []
    engine = BatchEngine(
        model, tokenizer, EngineConfig(max_batch_size=max(int(c) for c in b.engine_concurrency))
    )
    engine.start()
    try:
        modes = [None, *model.expert_names, *gate]
        for n in [int(c) for c in b.engine_concurrency]:
            ids = _chat_ids(tokenizer, [prompts_text[i % len(prompts_text)] for i in range(n)])
            row = result[str(n)]
            for name, choices in (
                ("loralab_base", [None] * n),
                ("loralab_mixed", [modes[i % len(modes)] for i in range(n)]),
            ):
                wall, got = run_engine(engine, ids, choices, max_tokens)
                row[f"{name}_tokens_per_s"] = round(n * max_tokens / wall, 2)
                equal = 0
                for i in range(min(check, n)):
                    routing = RowRouting.from_choices([choices[i]], model.expert_names)
                    equal += got[i] == _alone(model, ids[i], max_tokens, row_routing=routing)
                row[f"{name}_equal_alone"] = equal
            row["checked"] = min(check, n)
    finally:
        engine.stop()
    return result
