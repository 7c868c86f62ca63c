"""Speed and memory of a system in this process: prefill and decode tokens/s, time to first
token, peak memory; every system measured on the same batch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from loralab.data.records import Record
from loralab.measurement import PeakMemory, time_calls


@torch.no_grad()
def measure_system_cost(
    system: Any,
    records: Sequence[Record],
    input_ids: torch.Tensor,
    new_tokens: int,
    repeats: int,
    pad_token_id: int,
) -> dict[str, float | None]:
    """Cost of ``system`` on one batch of equal-length prompts ``input_ids`` [B, T] for ``records``.

    ``prefill_tokens_per_s``: B*T / one forward; ``decode_tokens_per_s``: B*(new-1) / (time to
    generate ``new_tokens`` minus time to generate 1); ``ttft_ms``: time to the first token of a
    single request, routing included; ``peak_memory_mb``: see :class:`PeakMemory`.
    Per-request mixtures that cannot batch run the batch one request at a time.
    """
    device = input_ids.device
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    gen = {"do_sample": False, "pad_token_id": pad_token_id, "eos_token_id": None}

    def run(b: dict[str, torch.Tensor], recs: Sequence[Record], n: int) -> None:
        try:
            system.generate(b, recs, max_new_tokens=n, min_new_tokens=n, **gen)
        except ValueError:  # one request at a time
            for i in range(len(recs)):
                system.generate(
                    {k: v[i : i + 1] for k, v in b.items()},
                    recs[i : i + 1],
                    max_new_tokens=n,
                    min_new_tokens=n,
                    **gen,
                )

    def prefill() -> None:
        system.nll({**batch, "labels": input_ids}, records)

    single = {k: v[:1] for k, v in batch.items()}

    def first_token() -> None:
        system.prepare(records[:1])
        run(single, records[:1], 1)

    # The memory run is also the warm-up of every timed call below (they do subsets of its work);
    # it is kept apart from the timings because sampling would slow them.
    with PeakMemory(device) as memory:
        system.prepare(records)
        prefill()
        run(batch, records, new_tokens)
    prefill_s = time_calls(prefill, device, repeats, warmup=0).median_s
    one_s = time_calls(lambda: run(batch, records, 1), device, repeats, warmup=0).median_s
    full_s = time_calls(lambda: run(batch, records, new_tokens), device, repeats, warmup=0).median_s
    ttft_s = time_calls(first_token, device, repeats, warmup=1).median_s
    b, t = input_ids.shape
    return {
        "prefill_tokens_per_s": b * t / prefill_s,
        "decode_tokens_per_s": b * (new_tokens - 1) / max(full_s - one_s, 1e-9),
        "ttft_ms": 1000 * ttft_s,
        "peak_memory_mb": memory.mib,
    }
