"""The batching decoder: iteration-level (continuous) batching of every mode in one forward pass.

One thread owns the model. Each iteration it (1) runs the operations queued between steps (hot
adding / removing an expert), (2) drops cancelled rows, (3) admits waiting requests up to
``max_batch_size`` rows and a prefill token budget, prefills them together (left-padded) and
appends them to the running rows' KV cache (``kv.BatchKV``), and (4) decodes one token for every
running row in one forward. Each row carries its own routing (``moelora.RowRouting``): an adapter
(one-hot), the base model (zeros) or the trained gate; rows leave as soon as they finish. Outputs
go to each request's ``sink`` (called from this thread). A failed prefill is retried row by row, so
a request that breaks the model fails alone.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from loralab.serving.decoding import Sampler, SamplingParams, TextStream
from loralab.serving.gate_weights import block_average, gate_payload
from loralab.serving.kv import BatchKV, left_pad
from moelora import MoELoraModel, RowRouting

log = logging.getLogger(__name__)

RouteChoice = Any  # None (base), an expert name (one-hot) or moelora.GATE


@dataclass(frozen=True)
class TokenEvent:
    """One generated token (the end-of-sequence token included): its text (empty for that one, or
    while a character or a stop string is incomplete) and, when asked, the gate's weights that
    produced it."""

    token_id: int
    text: str
    gate: dict[str, Any] | None = None


@dataclass(frozen=True)
class FinishEvent:
    reason: str  # "stop" | "length"
    text: str  # the last text delta (held-back text flushed at the end)
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class ErrorEvent:
    error: BaseException


Event = TokenEvent | FinishEvent | ErrorEvent


@dataclass
class EngineRequest:
    """A request as the engine sees it: token ids, one routing choice, sampling parameters."""

    prompt_ids: list[int]
    choice: RouteChoice
    params: SamplingParams
    sink: Callable[[Event], None]
    request_id: str = ""
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop generating (the client left): the row is dropped before the next step."""
        self.cancelled.set()


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 32
    max_queue: int = 256
    max_prefill_tokens: int = 2048  # prompt tokens admitted per iteration (at least one request)
    max_model_len: int = 2048

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "max_prefill_tokens", "max_model_len"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"engine.{name} must be >= 1, got {getattr(self, name)}")


class QueueFullError(RuntimeError):
    """The bounded queue of waiting requests is full."""


class EngineStoppedError(RuntimeError):
    """The engine is not running."""


@dataclass
class _Row:
    request: EngineRequest
    sampler: Sampler
    stream: TextStream
    generated: int = 0
    last_token: int = 0
    done: bool = False


class BatchEngine:
    """Continuous batching over a MoELoraModel (see the module docstring)."""

    def __init__(
        self,
        model: MoELoraModel,
        tokenizer: PreTrainedTokenizerBase,
        config: EngineConfig,
        on_step: Callable[[str, int], None] | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.on_step = on_step  # (kind "prefill" | "decode", rows) after each forward
        base: Any = model.base_model
        eos: Any = base.generation_config.eos_token_id
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = {int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None}
        pad: Any = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else 0
        self._block_mix = block_average(model)  # [blocks, moe layers]
        # transformers 5 names the KV cache argument `cache` (`past_key_values` is deprecated).
        forward = inspect.signature(base.forward).parameters
        self._cache_arg = "cache" if "cache" in forward else "past_key_values"
        self._cond = threading.Condition()
        self._waiting: deque[EngineRequest] = deque()
        self._ops: list[tuple[Callable[[], Any], concurrent.futures.Future]] = []
        self._rows: list[_Row] = []
        self._kv: BatchKV | None = None
        self._routing: RowRouting | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- control (any thread) ----------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="loralab-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def submit(self, request: EngineRequest) -> None:
        """Queue a request (raises QueueFullError when ``max_queue`` requests already wait)."""
        with self._cond:
            if not self.running:
                raise EngineStoppedError("the engine is not running")
            if len(self._waiting) >= self.config.max_queue:
                raise QueueFullError(
                    f"the queue is full ({self.config.max_queue} requests waiting); retry later"
                )
            self._waiting.append(request)
            self._cond.notify_all()

    def call_between_steps(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``fn`` on the engine thread between two forwards (hot add / remove of experts)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if not self.running:
                raise EngineStoppedError("the engine is not running")
            self._ops.append((fn, future))
            self._cond.notify_all()
        return future

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"running": len(self._rows), "waiting": len(self._waiting)}

    # -- the loop (engine thread) ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while self._iterate():
                    pass
        except BaseException as error:  # a bug in the loop itself: fail everyone, loudly
            log.exception("engine loop failed")
            self._fail_all(error)
            raise
        finally:
            self._fail_all(EngineStoppedError("the server is shutting down"))

    def _iterate(self) -> bool:
        with self._cond:
            while not (self._stopping or self._waiting or self._rows or self._ops):
                self._cond.wait()
            if self._stopping:
                return False
            ops, self._ops = self._ops, []
        for fn, future in ops:
            try:
                future.set_result(fn())
            except BaseException as error:
                future.set_exception(error)
            self._routing = None  # the experts may have changed: columns are rebuilt
        self._drop_finished()
        newcomers = self._admit()
        if newcomers:
            self._prefill(newcomers)
            self._drop_finished()
        if self._rows:
            self._decode()
            self._drop_finished()
        return True

    def _admit(self) -> list[EngineRequest]:
        admitted: list[EngineRequest] = []
        budget = self.config.max_prefill_tokens
        with self._cond:
            while self._waiting and len(self._rows) + len(admitted) < self.config.max_batch_size:
                request = self._waiting[0]
                if request.cancelled.is_set():
                    self._waiting.popleft()
                    continue
                if admitted and len(request.prompt_ids) > budget:
                    break
                budget -= len(request.prompt_ids)
                admitted.append(self._waiting.popleft())
        return admitted

    def _prefill(self, requests: list[EngineRequest]) -> None:
        try:
            kv, logits, gates = self._forward_prefill(requests)
        except Exception as error:
            if len(requests) == 1:
                log.exception("prefill failed for request %s", requests[0].request_id)
                _send(requests[0], ErrorEvent(error))
                return
            for request in requests:  # isolate the request that breaks the batch
                self._prefill([request])
            return
        rows = [
            _Row(r, Sampler(r.params), TextStream(self.tokenizer, r.params.stop)) for r in requests
        ]
        if self._kv is None:
            self._kv = kv
        else:
            self._kv.append(kv)
        self._rows.extend(rows)
        self._routing = None
        self._emit(rows, logits, gates)

    def _forward_prefill(
        self, requests: list[EngineRequest]
    ) -> tuple[BatchKV, torch.Tensor, torch.Tensor | None]:
        ids, mask = left_pad([r.prompt_ids for r in requests], self.pad_id)  # [n, L] each
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # [n, L]
        routing = RowRouting.from_choices([r.choice for r in requests], self.model.expert_names)
        record = any(r.params.gate_weights for r in requests)
        out, gates = self._forward(ids, mask, positions, routing, record)
        if self.on_step is not None:
            self.on_step("prefill", len(requests))
        cache = out.cache if self._cache_arg == "cache" else out.past_key_values
        return BatchKV(cache, mask), out.logits[:, -1].float(), gates

    def _decode(self) -> None:
        kv = self._kv
        assert kv is not None
        ids = torch.tensor([[row.last_token] for row in self._rows])  # [B, 1]
        mask, positions = kv.step_inputs()  # [B, T+1], [B, 1]
        if self._routing is None:
            choices = [row.request.choice for row in self._rows]
            self._routing = RowRouting.from_choices(choices, self.model.expert_names)
        record = any(row.request.params.gate_weights for row in self._rows)
        try:
            out, gates = self._forward(ids, mask, positions, self._routing, record, kv.cache)
        except Exception as error:  # the batch's cache is in an unknown state: fail its rows
            log.exception("decoding step failed for %d rows", len(self._rows))
            for row in self._rows:
                row.done = True
                _send(row.request, ErrorEvent(error))
            self._rows, self._kv, self._routing = [], None, None
            return
        kv.advance(mask)
        if self.on_step is not None:
            self.on_step("decode", len(self._rows))
        self._emit(self._rows, out.logits[:, -1].float(), gates)

    def _forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        routing: RowRouting,
        record: bool,
        cache: Any = None,
    ) -> tuple[Any, torch.Tensor | None]:
        """One forward of ``ids`` [rows, length] (a prefill starts a cache, a decode step passes
        ``cache``): the model's output (logits at the last position only) and, with ``record``,
        the gate weights there [rows, blocks, S]."""
        past = {} if cache is None else {self._cache_arg: cache}
        with self.model.recording() if record else nullcontext():
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                row_routing=routing,
                logits_to_keep=1,
                **past,
            )
            gates = self._gates(ids.shape[0], ids.shape[1]) if record else None
        return out, gates

    def _gates(self, rows: int, length: int) -> torch.Tensor:
        """The recorded gate weights at each row's last position, averaged per decoder block:
        [rows, blocks, S] (S = model.slot_names)."""
        weights = self.model.gate_trace().weights  # [L, rows * length, S]
        last = weights.view(weights.shape[0], rows, length, -1)[:, :, -1]  # [L, rows, S]
        return torch.einsum("bl,lrs->rbs", self._block_mix, last.float())  # [rows, blocks, S]

    def _emit(self, rows: Sequence[_Row], logits: torch.Tensor, gates: torch.Tensor | None) -> None:
        greedy = logits.argmax(dim=-1).tolist()  # [B]
        kv_lengths = self._kv.lengths().tolist() if self._kv is not None else []
        for i, row in enumerate(rows):
            request = row.request
            try:
                token = (
                    greedy[i] if row.sampler.generator is None else row.sampler.sample(logits[i])
                )
                row.last_token = token
                row.generated += 1
                eos = token in self.eos_ids and not request.params.ignore_eos
                text, stopped = ("", True) if eos else row.stream.push(token)
                gate = None
                if gates is not None and request.params.gate_weights:
                    gate = gate_payload(gates[i])
                _send(request, TokenEvent(token, text, gate))
                at_limit = row.generated >= request.params.max_tokens
                full = (
                    bool(kv_lengths) and kv_lengths[-len(rows) + i] + 1 >= self.config.max_model_len
                )
                if stopped:
                    self._finish(row, "stop")
                elif at_limit or full:
                    self._finish(row, "length")
            except Exception as error:  # this row only (a tokenizer or sink failure)
                log.exception("request %s failed", request.request_id)
                row.done = True
                _send(request, ErrorEvent(error))

    def _finish(self, row: _Row, reason: str) -> None:
        row.done = True
        text = row.stream.flush()  # after a stop string: "" (the text was cut before it)
        event = FinishEvent(reason, text, len(row.request.prompt_ids), row.generated)
        _send(row.request, event)

    def _drop_finished(self) -> None:
        keep = [
            i
            for i, row in enumerate(self._rows)
            if not (row.done or row.request.cancelled.is_set())
        ]
        if len(keep) == len(self._rows):
            return
        with self._cond:
            self._rows = [self._rows[i] for i in keep]
        if self._kv is not None:
            self._kv.keep(keep)
            if self._kv.rows == 0:
                self._kv = None
        self._routing = None

    def _fail_all(self, error: BaseException) -> None:
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
            rows, self._rows = self._rows, []
            ops, self._ops = self._ops, []
        for request in waiting + [row.request for row in rows if not row.done]:
            _send(request, ErrorEvent(error))
        for _, future in ops:
            future.set_exception(EngineStoppedError("the server is shutting down"))
        self._kv = None


def _send(request: EngineRequest, event: Event) -> None:
    try:
        request.sink(event)
    except Exception:  # a sink must not break the loop (its request is failed by the caller)
        log.exception("request %s: delivering %s failed", request.request_id, type(event).__name__)
        if not isinstance(event, ErrorEvent):
            raise
