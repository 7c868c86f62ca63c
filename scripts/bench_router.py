"""Router speed: one request at a time (p50 / p99), batched throughput, and decision / encoder time.

    python scripts/bench_router.py                                  # newest outputs/train_router/*/router
    python scripts/bench_router.py --model outputs/train_router/<time>/router --n 300
    python scripts/bench_router.py --single-threads 2       # torch's default threads for one request

Requests are held-out test-split instructions of all four labels (real lengths, truncated by the
encoder at its token limit) and, separately, the frozen exam-style check's multiple-choice questions
(question and four options; only their text is used).
One-request timings use one torch thread by default: on 2 cores shared with other jobs a second
thread mostly waits for a descheduled partner (p50 several times worse); batches use torch's
default.
overhead_ratio = total decision time / time spent inside the encoder, both timed in the same calls
(input policy, checks, classifier and decision object are the overhead). Timings on a shared CPU
move with its load: the summary records the 1-minute load average. The last line printed is a
JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

from omegaconf import OmegaConf

import loralab  # noqa: F401  (config resolvers)
from loralab.data.records import default_data_root
from loralab.routing.datasets import read_label_records, split_examples
from loralab.routing.evaluate import batch_throughput, measure_latency
from loralab.routing.exam_check import exam_items
from router import Router

ROOT = Path(__file__).resolve().parents[1]
DATA = OmegaConf.load(ROOT / "conf/data/default.yaml")
FILES = {str(k): str(v) for k, v in DATA.files.items()}


def newest_router() -> Path:
    found = sorted(
        ROOT.glob("outputs/train_router/*/router/router.json"), key=lambda p: p.stat().st_mtime
    )
    if not found:
        raise SystemExit(
            "no trained router under outputs/train_router/; run scripts/train_router.py or pass --model"
        )
    return found[-1].parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="a saved router folder")
    parser.add_argument("--n", type=int, default=200, help="single requests to time")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--single-threads",
        type=int,
        default=1,
        help="torch threads for one-request timings (1: steadiest on a shared CPU)",
    )
    parser.add_argument(
        "--batch-threads",
        type=int,
        default=None,
        help="torch threads for batches (default: torch's)",
    )
    args = parser.parse_args()

    import torch

    default_threads = torch.get_num_threads()
    model_dir = args.model or newest_router()
    router = Router.load(model_dir)
    records = read_label_records(default_data_root(), FILES, list(router.labels))
    test = split_examples(records, "test", 0.05, 0.05, max_per_label=args.n // 4 + 1)
    requests = [e.text for e in test][: args.n]
    exam = [i.text for i in exam_items()][: args.n]

    torch.set_num_threads(args.single_threads)
    single = measure_latency(router, requests)
    short = measure_latency(router, exam)
    torch.set_num_threads(args.batch_threads or default_threads)
    batch_rps = batch_throughput(router, requests * 2, args.batch_size)
    summary = {
        "model": str(model_dir),
        "model_version": router.model_version,
        "n_requests": len(requests),
        "p50_ms": round(single["p50_ms"], 3),
        "p99_ms": round(single["p99_ms"], 3),
        "encoder_p50_ms": round(single["encoder_p50_ms"], 3),
        "overhead_ratio": round(single["overhead_ratio"], 4),
        "batch_rps": round(batch_rps, 1),
        "batch_size": args.batch_size,
        "exam_p50_ms": round(short["p50_ms"], 3),
        "exam_p99_ms": round(short["p99_ms"], 3),
        "exam_overhead_ratio": round(short["overhead_ratio"], 4),
        "single_threads": args.single_threads,
        "batch_threads": args.batch_threads or default_threads,
        "cpu": platform.processor() or platform.machine(),
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "encoder": router.encoder.fingerprint(),
    }
    print(
        f"single request (test split): p50 {summary['p50_ms']} ms, p99 {summary['p99_ms']} ms, "
        f"encoder p50 {summary['encoder_p50_ms']} ms, overhead x{summary['overhead_ratio']}"
    )
    print(
        f"exam-style multiple-choice questions: p50 {summary['exam_p50_ms']} ms, "
        f"p99 {summary['exam_p99_ms']} ms"
    )
    print(f"batched ({args.batch_size}): {summary['batch_rps']} requests/s")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
