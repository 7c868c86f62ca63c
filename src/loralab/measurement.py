"""How the lab measures time and memory: one definition, used by the evaluation's cost table
(``evaluation/cost.py``), the training benchmark (``training/bench.py``) and the MoE-LoRA benchmark
(``scripts/bench_moelora.py``).

- **time**: wall clock (``time.perf_counter``), the median of ``repeats`` timed calls after
  ``warmup`` untimed ones; on CUDA the device is synchronised before and after each call. The torch
  CPU thread count is set (``set_threads``) and reported with the numbers.
- **peak memory**: the peak of the bytes allocated while the measured block runs, absolute (weights,
  KV cache and activations included). CUDA: ``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats``. CPU: the same quantity from the C allocator, glibc ``mallinfo2``'s
  in-use bytes (``uordblks + hblkhd``), read at entry and exit and sampled every ``period_s``
  (1 ms) by a thread in between (a block of memory that lives less than that can be missed). On
  CPU the figure is the whole process's allocations (tokenizer, data, anything else loaded too),
  and weights that safetensors maps from the file are invisible to the allocator until
  ``materialize_weights`` copies them.
- **weights**: the bytes of a model's parameters and buffers, each storage counted once
  (``weights_bytes``): exact, so systems that hold extra weights (more experts, a merged adapter,
  a classifier) show them.
"""

from __future__ import annotations

import ctypes
import gc
import itertools
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DEFAULT_REPEATS = 3
DEFAULT_PERIOD_S = 0.001
MIB = 2**20


def set_threads(threads: int | None) -> int:
    """Set torch's CPU thread count (None: leave torch's default) and return the count in use."""
    if threads is not None:
        if int(threads) < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Timing:
    """Seconds of each timed call, and their median (the reported figure)."""

    times_s: tuple[float, ...]

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)


def time_calls(
    fn: Callable[[], Any],
    device: torch.device,
    repeats: int = DEFAULT_REPEATS,
    warmup: int = 1,
) -> Timing:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return Timing(tuple(times))


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


def _allocator_reader() -> Callable[[], int] | None:
    """Bytes the C allocator has handed out and not freed (glibc >= 2.33), or None elsewhere."""
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2

    def read() -> int:
        info = mallinfo2()
        return int(info.uordblks + info.hblkhd)  # small-chunk heap + mmapped chunks

    return read


_READ_ALLOCATOR = _allocator_reader()


def allocator_in_use() -> int | None:
    """The process's in-use bytes from the C allocator now (None where mallinfo2 is missing)."""
    return None if _READ_ALLOCATOR is None else _READ_ALLOCATOR()


def memory_method(device: torch.device, period_s: float = DEFAULT_PERIOD_S) -> str:
    """How ``PeakMemory`` measures on ``device``, in words (for results and reports)."""
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated after reset_peak_memory_stats"
    if _READ_ALLOCATOR is None:
        return "unavailable (no glibc mallinfo2 on this platform)"
    return f"glibc mallinfo2 in-use bytes (uordblks + hblkhd), sampled every {period_s * 1e3:g} ms"


class PeakMemory:
    """Peak allocated bytes while the block runs, absolute (see the module docstring).

    ``peak_bytes`` is None on a CPU platform without glibc's ``mallinfo2``.
    """

    def __init__(self, device: torch.device, period_s: float = DEFAULT_PERIOD_S) -> None:
        self.device = device
        self.period_s = period_s
        self.peak_bytes: int | None = None
        self._read = _READ_ALLOCATOR
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        assert self._read is not None
        while not self._stop.wait(self.period_s):
            self.peak_bytes = max(self.peak_bytes or 0, self._read())

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self._read is not None:
            self.peak_bytes = self._read()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        elif self._thread is not None and self._read is not None:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes or 0, self._read())

    @property
    def mib(self) -> float | None:
        return None if self.peak_bytes is None else round(self.peak_bytes / MIB, 1)


def weights_bytes(module: torch.nn.Module, exclude: Any = ()) -> int:
    """Bytes of ``module``'s parameters and buffers, each underlying storage counted once (tied
    and viewed tensors are not double-counted); tensors in ``exclude`` (e.g. an unused gate) are
    left out."""
    skip = {id(t) for t in exclude}
    storages: dict[tuple[str, int], int] = {}
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if id(tensor) in skip or tensor.device.type == "meta":
            continue
        storage = tensor.untyped_storage()
        storages[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


@torch.no_grad()
def materialize_weights(module: torch.nn.Module) -> None:
    """Copy the CPU parameters and buffers of ``module`` into memory of the C allocator.

    transformers maps safetensors weights from the file; the allocator (and so the CPU peak
    memory) does not see such pages. After this copy it does, as CUDA's allocator sees weights on
    a GPU. Tied parameters are one Parameter object, so they stay tied. CUDA tensors: untouched.
    """
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if tensor.device.type == "cpu":
            tensor.data = tensor.data.clone()


def reset_peak_rss() -> bool:
    """Restart this process's resident-set high-water mark from its current RSS (Linux
    ``clear_refs`` 5), so that a later stage of one process reports its own peak; False where the
    kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def process_peak_rss_bytes() -> int | None:
    """This process's resident-set high-water mark (Linux VmHWM, since the last
    ``reset_peak_rss``), or None elsewhere."""
    status = Path("/proc/self/status")
    if not status.is_file():
        return None
    for line in status.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


def definition(
    device: torch.device,
    repeats: int,
    warmup: int,
    threads: int,
    period_s: float = DEFAULT_PERIOD_S,
) -> dict[str, Any]:
    """The parameters of this definition a set of numbers was measured with (for results files)."""
    return {
        "clock": "wall (time.perf_counter), median of the timed calls"
        + (", CUDA synchronised" if device.type == "cuda" else ""),
        "repeats": repeats,
        "warmup": warmup,
        "threads": threads,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "peak_memory": memory_method(device, period_s),
        "sample_period_ms": None if device.type == "cuda" else period_s * 1e3,
        "weights": "bytes of parameters and buffers, unique storages",
    }
