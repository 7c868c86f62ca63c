"""Speed and memory of MoE-LoRA against the base model, one PEFT adapter, PEFT X-LoRA and PEFT Arrow.

    python scripts/bench_moelora.py                        # trained experts found under outputs/
    python scripts/bench_moelora.py --experts-dir outputs/train_experts/<time>/adapters
    python scripts/bench_moelora.py --random-experts       # random-B PEFT experts on the real base

All methods use the same base model, experts, batch and lengths; each method (and each phase:
inference, training) runs in its own fresh process. Measured as ``loralab.measurement`` defines
it (the README's "How time and memory are measured"): wall clock, the median of --repeats timed
calls after one warm-up run, CUDA synchronised; --threads torch CPU threads.
Prefill = one plain forward over the prompt building the KV cache, logits of the last position
only. Decode tokens/s = B * (N - 1) / (time of generate(N) - time of generate(1)), greedy, with the
KV cache wherever the method allows it (PEFT X-LoRA turns it off). Gate training = forward +
backward + AdamW step over the trainable parameters (the MoE-LoRA gates, the X-LoRA classifier).
Peak memory: absolute peak allocated bytes of the worker process during prefill + generate(N)
(the warm-up run; training: during the training steps), weights included: CUDA
max_memory_allocated, CPU glibc mallinfo2 in-use bytes sampled every 1 ms. Weights: bytes of the
method's parameters and buffers. The last line is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

import loralab  # noqa: F401  (config resolvers)
from loralab.artifacts import verify_adapter
from loralab.base_model import load_base_model, weights_fingerprint
from loralab.measurement import (
    PeakMemory,
    definition,
    materialize_weights,
    set_threads,
    time_calls,
    weights_bytes,
)
from loralab.training.random_experts import make_random_experts
from moelora import GateConfig, MoELoraConfig, MoELoraModel, load_gate, read_gate_metadata

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = tuple(str(d) for d in OmegaConf.load(ROOT / "conf/data/default.yaml").domains)
METHODS = (
    "base",
    "peft_merged",
    "peft_unmerged",
    "moelora_dense",
    "moelora_topk",
    "xlora",
    "arrow",
)
TRAINABLE = ("moelora_dense", "moelora_topk", "xlora")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--experts-dir",
        type=Path,
        help="folder with one adapter per domain of conf/data/default.yaml",
    )
    p.add_argument("--random-experts", action="store_true", help="random PEFT experts on the base")
    p.add_argument("--gate-dir", type=Path, help="a trained gate (<run>/moelora) for MoE-LoRA")
    p.add_argument("--base-model", default="smollm2_135m", help="conf/base_model/<name>.yaml")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--batch", type=int, help="default: 2 on CPU, 8 on CUDA")
    p.add_argument("--prompt-len", type=int, help="default: 64 on CPU, 512 on CUDA")
    p.add_argument("--new-tokens", type=int, help="default: 16 on CPU, 256 on CUDA")
    p.add_argument("--repeats", type=int, default=3, help="timed calls (median) after a warm-up")
    p.add_argument("--train-steps", type=int, default=3, help="timed gate-training steps (median)")
    p.add_argument("--top-k", type=int, default=2, help="k of the MoE-LoRA top-k variant")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    p.add_argument("--compile", action="store_true", help="torch.compile base and MoE-LoRA models")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: "<method>:<infer|train>"
    return p.parse_args(argv)


# -- measuring (worker process) ------------------------------------------------------------------


def measure_inference(
    model: Any,
    batch: dict[str, torch.Tensor],
    args: argparse.Namespace,
    device: torch.device,
) -> dict[str, float | None]:
    def generate(n: int) -> Callable[[], Any]:
        return lambda: model.generate(
            **batch, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
        )

    def prefill() -> None:
        model(**batch, logits_to_keep=1)  # the KV cache where the method keeps one

    with torch.inference_mode():
        with PeakMemory(device) as memory:  # also the warm-up run of the timed calls below
            prefill()
            generate(args.new_tokens)()
        prefill_s = time_calls(prefill, device, args.repeats, warmup=0).median_s
        one_s = time_calls(generate(1), device, args.repeats, warmup=0).median_s
        full_s = time_calls(generate(args.new_tokens), device, args.repeats, warmup=0).median_s
    rows = batch["input_ids"].shape[0]
    return {
        "prefill_tok_s": round(batch["input_ids"].numel() / prefill_s, 1),
        "decode_tok_s": round(rows * (args.new_tokens - 1) / max(full_s - one_s, 1e-9), 1),
        "peak_mem_mib": memory.mib,
        "weights_mib": round(weights_bytes(model) / 2**20, 1),
    }


def measure_training(
    model: Any,
    batch: dict[str, torch.Tensor],
    args: argparse.Namespace,
    device: torch.device,
) -> dict[str, float]:
    """Tokens/s of forward + backward + AdamW step over the trainable parameters."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(**batch, labels=batch["input_ids"], use_cache=False).loss.backward()
        optimizer.step()

    with PeakMemory(device) as memory:
        seconds = time_calls(step, device, args.train_steps, warmup=1).median_s
    return {
        "train_tok_s": round(batch["input_ids"].numel() / seconds, 1),
        "trainable_params": sum(p.numel() for p in params),
        "train_peak_mem_mib": memory.mib,
    }


# -- the methods ---------------------------------------------------------------------------------


def moelora_config(args: argparse.Namespace, sparse: bool) -> MoELoraConfig:
    gate = GateConfig()
    if args.gate_dir:
        gate = MoELoraConfig.from_dict(read_gate_metadata(args.gate_dir)["config"]).gate
    if not sparse:
        return MoELoraConfig(gate=gate, compute_path="dense")
    return MoELoraConfig(gate=replace(gate, top_k=gate.top_k or args.top_k), compute_path="topk")


def build_method(name: str, base: Any, experts: dict[str, Path], args: argparse.Namespace) -> Any:
    from peft import PeftModel

    from loralab.baselines import build_arrow, build_xlora

    first = str(experts[DOMAINS[0]])
    if name == "base":
        model = base
    elif name == "peft_merged":
        model = PeftModel.from_pretrained(base, first).merge_and_unload()
    elif name == "peft_unmerged":
        model = PeftModel.from_pretrained(base, first)
    elif name in ("moelora_dense", "moelora_topk"):
        fingerprint = weights_fingerprint(base)
        moe_config = moelora_config(args, sparse=name == "moelora_topk")
        moe = MoELoraModel.from_adapters(base, experts, moe_config, fingerprint)
        if args.gate_dir:
            load_gate(moe, args.gate_dir)
        model = moe
    elif name == "xlora":
        model = build_xlora(base, experts)
    elif name == "arrow":
        model = build_arrow(base, experts, top_k=args.top_k)
    else:
        raise ValueError(f"unknown method {name!r}; known: {list(METHODS)}")
    if args.compile and name in ("base", "moelora_dense", "moelora_topk"):
        hf_model = model.base_model if isinstance(model, MoELoraModel) else model
        hf_model.compile(dynamic=True)
    return model.eval()


def load_base(args: argparse.Namespace) -> tuple[Any, Any]:
    cfg = OmegaConf.load(ROOT / "conf" / "base_model" / f"{args.base_model}.yaml")
    assert isinstance(cfg, DictConfig)
    cfg.device, cfg.dtype = args.device, args.dtype
    base, _ = load_base_model(cfg)
    return base, cfg


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """One method, one phase, in this process; returns its measurements."""
    method, phase = args.worker.split(":")
    torch.manual_seed(args.seed)
    base, _ = load_base(args)
    materialize_weights(base)  # so that the CPU allocator counts the weights, as CUDA's does
    device = next(base.parameters()).device
    experts = {d: args.experts_dir / d for d in DOMAINS}
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(
        10, int(base.config.vocab_size), (args.batch, args.prompt_len), generator=generator
    )
    batch = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    model = build_method(method, base, experts, args)
    if phase == "train":
        return measure_training(model, batch, args, device)
    return measure_inference(model, batch, args, device)


# -- orchestration -------------------------------------------------------------------------------


def find_expert_dirs(root: Path) -> Path | None:
    """Newest ``adapters`` folder under outputs/ holding a manifest for every domain."""
    candidates = [
        p
        for p in (root / "outputs").glob("**/adapters")
        if all((p / d / "manifest.json").is_file() for d in DOMAINS)
    ]
    return max(candidates, key=lambda p: p.stat().st_mtime, default=None)


def spawn(args: argparse.Namespace, argv: list[str], method: str, phase: str) -> dict[str, Any]:
    command = [sys.executable, __file__, *argv, "--experts-dir", str(args.experts_dir)]
    command += ["--batch", str(args.batch), "--prompt-len", str(args.prompt_len)]
    command += ["--new-tokens", str(args.new_tokens), "--worker", f"{method}:{phase}"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    threads = set_threads(args.threads)
    if args.worker:
        result = run_worker(args)
        print(json.dumps(result))
        return result

    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; known: {list(METHODS)}")
    base, base_cfg = load_base(args)
    device, dtype = next(base.parameters()).device, next(base.parameters()).dtype
    cuda = device.type == "cuda"
    args.batch = args.batch or (8 if cuda else 2)
    args.prompt_len = args.prompt_len or (512 if cuda else 64)
    args.new_tokens = args.new_tokens or (256 if cuda else 16)
    workdir = tempfile.TemporaryDirectory(prefix="bench_moelora_")
    if args.random_experts:
        fingerprint = weights_fingerprint(base)
        make_random_experts(base, DOMAINS, workdir.name, fingerprint, str(base_cfg.name))
        args.experts_dir = Path(workdir.name)
        source = "random experts (random A and B, r16, all linear layers) on the base model"
    else:
        args.experts_dir = args.experts_dir or find_expert_dirs(ROOT)
        if args.experts_dir is None:
            raise SystemExit(
                "no trained experts under outputs/: pass --experts-dir or --random-experts"
            )
        fingerprint = weights_fingerprint(base)
        for d in DOMAINS:  # both adapter files' hashes and the base fingerprint, before any worker
            verify_adapter(args.experts_dir / d, fingerprint)
        source = f"trained experts from {args.experts_dir}"
    del base
    print(f"experts: {source}", flush=True)
    forwarded = [a for a in argv if a != "--random-experts"]

    results: dict[str, dict[str, Any]] = {}
    for method in methods:
        row = spawn(args, forwarded, method, "infer")
        if method in TRAINABLE:
            row.update(spawn(args, forwarded, method, "train"))
        results[method] = row
        print(f"{method:14s} {json.dumps(row)}", flush=True)  # JSON: a cut-off run still parses
    workdir.cleanup()

    def get(method: str, key: str) -> float | None:
        return results.get(method, {}).get(key)

    summary = {
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({threads} thread(s))",
        "dtype": str(dtype).removeprefix("torch."),
        "base_model": str(base_cfg.name),
        "experts": source,
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "top_k": args.top_k,
        "compiled": args.compile,
        "measurement": definition(device, args.repeats, 1, threads),
        "results": results,
        "prefill_ratio_vs_base": ratio(
            get("moelora_dense", "prefill_tok_s"), get("base", "prefill_tok_s")
        ),
        "prefill_ratio_topk_vs_base": ratio(
            get("moelora_topk", "prefill_tok_s"), get("base", "prefill_tok_s")
        ),
        "decode_ratio_vs_base": ratio(
            get("moelora_dense", "decode_tok_s"), get("base", "decode_tok_s")
        ),
        "prefill_ratio_vs_xlora": ratio(
            get("moelora_dense", "prefill_tok_s"), get("xlora", "prefill_tok_s")
        ),
        "decode_ratio_vs_xlora": ratio(
            get("moelora_dense", "decode_tok_s"), get("xlora", "decode_tok_s")
        ),
        "train_ratio_vs_xlora": ratio(
            get("moelora_dense", "train_tok_s"), get("xlora", "train_tok_s")
        ),
    }
    print_table(summary)
    print(json.dumps(summary))
    return summary


def print_table(summary: dict[str, Any]) -> None:
    print(
        f"\n{summary['device']}, {summary['dtype']}, batch {summary['batch']}, prompt "
        f"{summary['prompt_len']}, {summary['new_tokens']} new tokens; {summary['experts']}"
    )
    columns = (
        "prefill_tok_s",
        "decode_tok_s",
        "peak_mem_mib",
        "weights_mib",
        "train_tok_s",
        "train_peak_mem_mib",
    )
    print(f"{'method':14s}" + "".join(f"{c:>19s}" for c in columns))
    for name, row in summary["results"].items():
        print(
            f"{name:14s}"
            + "".join(f"{row.get(c, row.get('error', '')[:18]) or '':>19}" for c in columns)
        )


if __name__ == "__main__":
    main()
