"""Load benchmark of the server (loopback only, bounded): N chat requests at C concurrent.

Loads (the same prompts, N, C and max_tokens in each):

- ``mixed``: round robin over ``bench.models`` (every mode: base, each expert, auto, moe);
- ``single``: every request to ``bench.single_model`` (one adapter);
- ``sequential``: plain ``generate`` of PEFT with that adapter, one request at a time, in this
  process (the server stopped), on the first ``bench.sequential_requests`` prompts;
- ``vllm`` (``bench.vllm=true``): vLLM's CPU build serving the run's experts (``--max-loras 3``),
  then the loralab server, each given the same ``bench.vllm_requests`` requests round robin over
  base + the experts at ``bench.vllm_concurrency``, half of them streamed.

Prompts are the instructions of the data's test split (``data.domains`` and general), cut to
``bench.max_prompt_chars``. Greedy decoding; ``bench.ignore_eos`` makes every answer exactly
``max_tokens`` long, so tokens per second compare like with like.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from omegaconf import DictConfig

from loralab.data.records import load_domain_split
from loralab.serving.loading import REPO, find_experts, run_paths
from loralab.serving.vllm_cpu import free_port, stop_process_group

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    ok: bool
    latency_s: float
    ttft_s: float | None  # streamed requests only
    tokens: int
    error: str = ""


def bench_prompts(data_cfg: Any, count: int, max_chars: int) -> list[str]:
    """Test-split instructions, interleaved over ``data.domains`` and general, cut to ``max_chars``."""
    domains = [*data_cfg["domains"], "general"]
    per_domain = [load_domain_split(data_cfg, d, "test", limit=count) for d in domains]
    prompts = [r.instruction[:max_chars] for group in zip(*per_domain, strict=False) for r in group]
    if not prompts:
        raise ValueError("no test records to build benchmark prompts from (data.root?)")
    return prompts


def requests_for(
    models: Sequence[str],
    prompts: Sequence[str],
    n: int,
    max_tokens: int,
    ignore_eos: bool,
    stream_every: int,
) -> list[dict[str, Any]]:
    """n chat bodies: model i % len(models), prompt i % len(prompts), every stream_every-th streamed."""
    bodies = []
    for i in range(n):
        body: dict[str, Any] = {
            "model": models[i % len(models)],
            "messages": [{"role": "user", "content": prompts[i % len(prompts)]}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": ignore_eos,
            "stream": stream_every > 0 and i % stream_every == 0,
        }
        if body["stream"]:
            body["stream_options"] = {"include_usage": True}
        bodies.append(body)
    return bodies


async def _one(client: httpx.AsyncClient, body: dict[str, Any]) -> Sample:
    start = time.perf_counter()
    try:
        if not body["stream"]:
            r = await client.post("/v1/chat/completions", json=body)
            if r.status_code != 200:
                return Sample(
                    False, time.perf_counter() - start, None, 0, f"{r.status_code} {r.text[:200]}"
                )
            return Sample(
                True, time.perf_counter() - start, None, int(r.json()["usage"]["completion_tokens"])
            )
        first, tokens = None, 0
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                return Sample(
                    False, time.perf_counter() - start, None, 0, f"{r.status_code} {text[:200]}"
                )
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return Sample(
                        False, time.perf_counter() - start, None, 0, str(chunk["error"])[:200]
                    )
                if first is None and any(
                    c.get("delta", {}).get("content") for c in chunk.get("choices", [])
                ):
                    first = time.perf_counter() - start
                if chunk.get("usage"):
                    tokens = int(chunk["usage"]["completion_tokens"])
        return Sample(True, time.perf_counter() - start, first, tokens)
    except (httpx.HTTPError, ValueError, KeyError) as error:
        return Sample(
            False, time.perf_counter() - start, None, 0, f"{type(error).__name__}: {error}"
        )


async def _load(
    url: str, bodies: list[dict[str, Any]], concurrency: int, timeout_s: float
) -> tuple[list[Sample], float]:
    semaphore = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:

        async def bounded(body: dict[str, Any]) -> Sample:
            async with semaphore:
                return await _one(client, body)

        start = time.perf_counter()
        samples = await asyncio.gather(*(bounded(b) for b in bodies))
        return list(samples), time.perf_counter() - start


def run_load(
    url: str, bodies: list[dict[str, Any]], concurrency: int, timeout_s: float = 600.0
) -> dict[str, Any]:
    """Send ``bodies`` with at most ``concurrency`` in flight; throughput and latency summary."""
    samples, wall = asyncio.run(_load(url, bodies, concurrency, timeout_s))
    ok = [s for s in samples if s.ok]
    errors = [s.error for s in samples if not s.ok]
    latencies = sorted(s.latency_s * 1000 for s in ok)
    ttfts = sorted(s.ttft_s * 1000 for s in ok if s.ttft_s is not None)
    summary: dict[str, Any] = {
        "requests": len(samples),
        "concurrency": concurrency,
        "errors": len(errors),
        "tokens": sum(s.tokens for s in ok),
        "wall_s": round(wall, 2),
        "tokens_per_s": round(sum(s.tokens for s in ok) / wall, 2),
        "p50_ms": round(_percentile(latencies, 50), 1),
        "p99_ms": round(_percentile(latencies, 99), 1),
        "ttft_p50_ms": round(_percentile(ttfts, 50), 1),
    }
    if errors:
        summary["first_errors"] = errors[:3]
    return summary


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return float(values[0])
    return float(statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1])


class ServeProcess:
    """``scripts/serve.py`` in its own process group on a free loopback port (stopped on exit)."""

    def __init__(self, overrides: Sequence[str], log_dir: Path, timeout_s: float = 900.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"serve-{self.port}.log"
        command = [
            sys.executable,
            str(REPO / "scripts" / "serve.py"),
            *overrides,
            f"server.port={self.port}",
            f"hydra.run.dir={log_dir / f'serve-{self.port}'}",
        ]
        with self.log_path.open("w") as logf:
            self.process = subprocess.Popen(
                command,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=os.getcwd(),
            )
        self._wait(timeout_s)

    def _wait(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{tail}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(
            f"the server was not healthy after {timeout_s:.0f} s (log {self.log_path})"
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            stop_process_group(self.process.pid, self.process, grace_s=20)

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def sequential_generate(
    cfg: DictConfig, adapter: str, prompts: Sequence[str], max_tokens: int, ignore_eos: bool
) -> dict[str, Any]:
    """PEFT with one adapter, plain ``generate``, one request at a time: tokens per second."""
    import torch
    from peft import PeftModel

    from loralab.base_model import load_base_model

    if cfg.server.num_threads:  # the same threads as the server
        torch.set_num_threads(int(cfg.server.num_threads))
    base, tokenizer = load_base_model(cfg.base_model, cfg.paths.cache_dir)
    folder = find_experts(run_paths(Path(str(cfg.run_dir)))["experts"])[adapter]
    model = PeftModel.from_pretrained(base, str(folder)).eval()
    extra = {"min_new_tokens": max_tokens} if ignore_eos else {}
    tokens, start = 0, 0.0
    with torch.inference_mode():
        for i, prompt in enumerate([prompts[0], *prompts]):  # the first one warms up, untimed
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
            if i == 1:
                start = time.perf_counter()
            out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False, **extra)
            if i > 0:
                tokens += out.shape[1] - ids["input_ids"].shape[1]
    wall = time.perf_counter() - start
    return {
        "requests": len(prompts),
        "tokens": tokens,
        "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 2),
    }


def run_bench(cfg: DictConfig, serve_overrides: Sequence[str]) -> dict[str, Any]:
    """Every load of the module docstring; returns the summary (the script prints it as JSON)."""
    b = cfg.bench
    prompts = bench_prompts(cfg.data, int(b.prompts_per_domain), int(b.max_prompt_chars))
    max_tokens, ignore_eos = int(b.max_tokens), bool(b.ignore_eos)
    n, c = int(b.requests), int(b.concurrency)
    stream_every = int(b.stream_every)
    result: dict[str, Any] = {
        "experiment": str(cfg.get("experiment_name")),
        "run_dir": str(cfg.run_dir),
        "max_tokens": max_tokens,
        "ignore_eos": ignore_eos,
        "prompts": len(prompts),
    }
    log_dir = Path(tempfile.mkdtemp(prefix="bench_serve-"))
    sequential = sequential_generate(
        cfg, str(b.single_model), prompts[: int(b.sequential_requests)], max_tokens, ignore_eos
    )
    mixed_bodies = requests_for(list(b.models), prompts, n, max_tokens, ignore_eos, stream_every)
    single_bodies = requests_for(
        [str(b.single_model)], prompts, n, max_tokens, ignore_eos, stream_every
    )
    with ServeProcess(serve_overrides, log_dir) as server:
        run_load(server.url, mixed_bodies[:c], c)  # warm-up, untimed
        mixed = run_load(server.url, mixed_bodies, c)
        single = run_load(server.url, single_bodies, c)
        if b.vllm:
            bodies = _vllm_mix(cfg, prompts)
            loralab = run_load(server.url, bodies, int(b.vllm_concurrency))
            result["vllm_mix"] = {"loralab": loralab}
    result.update(mixed)
    result["models"] = list(b.models)
    result["single"] = single
    result["sequential"] = sequential
    result["mixed_vs_single_ratio"] = round(mixed["tokens_per_s"] / single["tokens_per_s"], 3)
    result["batched_vs_sequential_ratio"] = round(
        mixed["tokens_per_s"] / sequential["tokens_per_s"], 3
    )
    if b.vllm:
        result["vllm_mix"]["vllm"] = _vllm_run(cfg, prompts)
        ours, theirs = result["vllm_mix"]["loralab"], result["vllm_mix"]["vllm"]
        result["loralab_vs_vllm_tokens_per_s_ratio"] = round(
            ours["tokens_per_s"] / theirs["tokens_per_s"], 3
        )
    return result


def _vllm_mix(cfg: DictConfig, prompts: Sequence[str]) -> list[dict[str, Any]]:
    """The vLLM comparison's load: the base model (under its own name, which both servers
    serve) + each expert, round robin, half streamed."""
    from loralab.artifacts import read_manifest

    experts = find_experts(run_paths(Path(str(cfg.run_dir)))["experts"])
    base_name = str(read_manifest(next(iter(experts.values())))["base_model"]["name"])
    models = [base_name, *experts]
    b = cfg.bench
    return requests_for(
        models, prompts, int(b.vllm_requests), int(b.max_tokens), bool(b.ignore_eos), 2
    )


def _vllm_run(cfg: DictConfig, prompts: Sequence[str]) -> dict[str, Any]:
    from loralab.serving import vllm_cpu

    python = vllm_cpu.ensure_env()
    vcfg = vllm_cpu.config_for_run(
        str(cfg.run_dir),
        dtype=str(cfg.bench.vllm_dtype),
        max_model_len=int(cfg.server.max_model_len),
    )
    with vllm_cpu.start_server(vcfg, python) as server:
        bodies = _vllm_mix(cfg, prompts)
        run_load(
            server.url, bodies[: int(cfg.bench.vllm_concurrency)], int(cfg.bench.vllm_concurrency)
        )
        summary = run_load(server.url, bodies, int(cfg.bench.vllm_concurrency))
    summary["dtype"] = str(cfg.bench.vllm_dtype)
    return summary
