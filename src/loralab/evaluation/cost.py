"""Speed and memory of a system in this process: prefill and decode tokens/s, time to first
token, peak memory; every system measured on the same batch."""

from __future__ import annotations

import ctypes
import gc
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from loralab.data.records import Record


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


def _heap_reader() -> Callable[[], int] | None:
    """Bytes malloc has handed out and not freed (glibc >= 2.33 ``mallinfo2``), else None."""
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2

    def read() -> int:
        info = mallinfo2()
        return int(info.uordblks + info.hblkhd)

    return read


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class PeakMemory:
    """Peak memory of a block: CUDA peak allocated (absolute, weights included); on CPU the peak
    growth of malloc'd bytes inside the block (the tensors it allocates: activations, KV cache,
    logits), sampled every millisecond (a tensor that lives less long can be missed). Where
    ``mallinfo2`` is missing, RSS growth, which under-reports in a long-lived process because
    freed pages are reused."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._read = _heap_reader() or _rss
        self._stop = threading.Event()
        self._peak = 0
        self._start = 0
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._peak = max(self._peak, self._read())

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            self._start = self._peak = self._read()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            self._peak = torch.cuda.max_memory_allocated()
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, self._read())

    @property
    def mib(self) -> float:
        """CUDA: peak allocated (weights included). CPU: peak growth inside the block."""
        value = self._peak if self.cuda else self._peak - self._start
        return round(value / 2**20, 1)


def timed(fn: Callable[[], Any], repeats: int, device: torch.device) -> float:
    """Median seconds of ``repeats`` calls (synchronised on CUDA); the caller warms ``fn`` up."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def measure_system_cost(
    system: Any,
    records: Sequence[Record],
    input_ids: torch.Tensor,
    new_tokens: int,
    repeats: int,
    pad_token_id: int,
) -> dict[str, float]:
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
    prefill_s = timed(prefill, repeats, device)
    one_s = timed(lambda: run(batch, records, 1), repeats, device)
    full_s = timed(lambda: run(batch, records, new_tokens), repeats, device)
    ttft_s = timed(first_token, repeats, device)
    b, t = input_ids.shape
    return {
        "prefill_tokens_per_s": b * t / prefill_s,
        "decode_tokens_per_s": b * (new_tokens - 1) / max(full_s - one_s, 1e-9),
        "ttft_ms": 1000 * ttft_s,
        "peak_memory_mb": memory.mib,
    }
