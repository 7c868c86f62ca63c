"""What serving costs per system, measured as ``loralab.measurement`` defines it, on one batch of
equal-length prompts shared by every system:

- ``prefill_tokens_per_s`` = B*T / one plain forward over the prompts that builds the KV cache
  (where the system keeps one) and computes the logits of the last position only;
- ``decode_tokens_per_s`` = B*(N-1) / (t(generate N) - t(generate 1)), greedy;
- ``ttft_ms``: one request, from its token ids to its first generated token, with the system's
  routing INSIDE the timed call (the router's ``route`` on the request text every time);
- ``peak_memory_mb``: absolute peak allocated memory during prefill + generate(N) of the batch;
- ``weights_mb``: the bytes of the parameters and buffers the system runs on.

Batch routings (which expert each row uses) are decided before the prefill / decode timings;
their cost is what the time to first token includes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from loralab.data.records import Record
from loralab.evaluation.build import chosen_systems
from loralab.evaluation.sets import EvalSet
from loralab.evaluation.systems import (
    ModelSystem,
    RoutedSystem,
    row_routing,
    served_choice,
    uses_gate,
)
from loralab.measurement import MIB, PeakMemory, time_calls, weights_bytes

COST_SET = "cost"


def costed_systems(
    cost_cfg: Mapping[str, Any], names: Sequence[str], experts: Sequence[str]
) -> set[str]:
    """The systems whose cost is measured: none when ``enabled`` is false, else ``systems``
    (``expert_*`` expanded; null = every evaluated system), each of which must be evaluated."""
    if not cost_cfg.get("enabled", True):
        return set()
    return chosen_systems("eval.cost.systems", cost_cfg.get("systems"), names, experts)


def cost_prompts(
    sets: Mapping[str, EvalSet], prompt_tokens: int, batch_size: int, device: torch.device
) -> tuple[torch.Tensor, list[Record]]:
    """``batch_size`` prompts of ``prompt_tokens`` tokens [B, T], taken from each single-domain
    set in turn (so routers see every domain), and their records."""
    pool = [
        (s, i)
        for i in range(max(len(s.records) for s in sets.values()))
        for s in sets.values()
        if s.name != "two_domain" and i < len(s.records)
    ]
    rows, records = [], []
    for s, i in pool:
        ids = s.examples[i].input_ids
        if len(ids) >= prompt_tokens:
            rows.append(ids[:prompt_tokens])
            records.append(s.records[i])
        if len(rows) == batch_size:
            break
    if not rows:
        raise ValueError(
            f"no evaluation prompt has {prompt_tokens} tokens: lower eval.cost.prompt_tokens"
        )
    return torch.tensor(rows, device=device), records


class Served:
    """How one system serves: ``forward`` / ``generate`` of a batch whose routing is decided,
    ``first_token`` of one request (deciding its routing inside), and its weights."""

    def __init__(
        self,
        model: Any,
        routing: Any = None,
        decide: Callable[[Record], Any] | None = None,
        exclude: Sequence[torch.Tensor] = (),
    ) -> None:
        self.model = model
        self._routing = routing  # RowRouting of the batch (routed systems)
        self._decide = decide  # Record -> RowRouting of one request (routed systems)
        self.weights_bytes = weights_bytes(model, exclude)

    def _kwargs(self, routing: Any) -> dict[str, Any]:
        return {} if routing is None else {"row_routing": routing}

    def forward(self, batch: Mapping[str, torch.Tensor]) -> None:
        self.model(**batch, logits_to_keep=1, **self._kwargs(self._routing))

    def generate(self, batch: Mapping[str, torch.Tensor], n: int, routing: Any = None) -> None:
        routing = self._routing if routing is None else routing
        self.model.generate(
            **batch,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
            **self._kwargs(routing),
        )

    def first_token(self, record: Record, batch: Mapping[str, torch.Tensor]) -> None:
        routing = None if self._decide is None else self._decide(record)
        self.generate(batch, 1, routing)


def served_routed(model: Any, system: RoutedSystem, records: Sequence[Record]) -> Served:
    """A routed system on the shared MoE-LoRA model; its weights leave out the gate unless the
    system uses it."""
    device = next(iter(model.moe_layers()))[1].lora_A.device
    names = model.expert_names

    def routing_of(recs: Sequence[Record], choose: Callable[[Record], Any]) -> Any:
        return row_routing([served_choice(choose(r)) for r in recs], names, device)

    live = system.route_live or system.choose
    gated = any(uses_gate(system.choose(r)) for r in records)
    return Served(
        model,
        routing_of(records, system.choose),
        lambda record: routing_of([record], live),
        () if gated else model.gate_parameters(),
    )


def served_model(system: ModelSystem) -> Served:
    return Served(system.model)


@torch.no_grad()
def measure_cost(
    served: Served,
    input_ids: torch.Tensor,
    records: Sequence[Record],
    new_tokens: int,
    repeats: int,
) -> dict[str, float | None]:
    """The cost metrics of one system (see the module docstring) on ``input_ids`` [B, T]."""
    device = input_ids.device
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    single = {k: v[:1] for k, v in batch.items()}
    # The memory run is also the warm-up of the prefill and decode timings (same calls); it is
    # not timed because the allocator sampling slows it.
    with PeakMemory(device) as memory:
        served.forward(batch)
        served.generate(batch, new_tokens)
    prefill_s = time_calls(lambda: served.forward(batch), device, repeats, warmup=0).median_s
    one_s = time_calls(lambda: served.generate(batch, 1), device, repeats, warmup=0).median_s
    full_s = time_calls(lambda: served.generate(batch, new_tokens), device, repeats, warmup=0)
    ttft = time_calls(lambda: served.first_token(records[0], single), device, repeats, warmup=1)
    b, t = input_ids.shape
    return {
        "prefill_tokens_per_s": b * t / prefill_s,
        "decode_tokens_per_s": b * (new_tokens - 1) / max(full_s.median_s - one_s, 1e-9),
        "ttft_ms": 1000 * ttft.median_s,
        "peak_memory_mb": memory.mib,
        "weights_mb": round(served.weights_bytes / MIB, 1),
    }


def cost_metrics(system: str, values: Mapping[str, float | None]) -> list[dict[str, Any]]:
    """Rows of ``results['metrics']`` (set ``cost``); an unavailable value is left out."""
    return [
        {
            "system": system,
            "set": COST_SET,
            "metric": k,
            "value": v,
            "ci_low": None,
            "ci_high": None,
        }
        for k, v in values.items()
        if v is not None
    ]
