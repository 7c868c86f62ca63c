"""The systems compared, all over the same frozen experts: how each scores and generates a request.

Request-level systems (base, single experts, oracle, merges, router, router soft mixture) share one
PEFT model holding every expert and merge; each request picks a ``Choice``:
``None`` (base model), an adapter name, ``{adapter: weight}`` (an exact weighted sum of the
experts' LoRA deltas) or a tuple of adapter names (the best of them per request: the two-domain
oracle). Token-level systems (MoE-LoRA, X-LoRA, Arrow) are models of their own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from loralab.data.records import Record
from loralab.evaluation.nll import batch_nll

Choice = Union[None, str, dict[str, float], tuple[str, ...]]  # noqa: UP007  (runtime alias)
Batch = Mapping[str, torch.Tensor]
PEFT_BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch (adapter_names=...)


@contextlib.contextmanager
def weighted_adapters(model: PeftModel, weights: Mapping[str, float]) -> Iterator[None]:
    """Activate several adapters at once, each scaled by its weight: the layer adds
    ``sum_i w_i * scaling_i * B_i A_i x``, the exact weighted sum of the experts' deltas."""
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    saved = [dict(m.scaling) for m in layers]
    previous = model.active_adapter
    model.base_model.set_adapter(list(weights))  # type: ignore[operator]
    for layer in layers:
        for name, w in weights.items():
            if name in layer.scaling:
                layer.scaling[name] = layer.scaling[name] * float(w)
    try:
        yield
    finally:
        for layer, scaling in zip(layers, saved, strict=True):
            layer.scaling.clear()
            layer.scaling.update(scaling)
        model.set_adapter(previous)


@contextlib.contextmanager
def activated(model: PeftModel, choice: Choice) -> Iterator[None]:
    """Run ``model`` as ``choice``: base (adapters off), one adapter, or a weighted sum."""
    if choice is None:
        with model.disable_adapter():
            yield
    elif isinstance(choice, str):
        previous = model.active_adapter
        model.set_adapter(choice)
        try:
            yield
        finally:
            model.set_adapter(previous)
    elif isinstance(choice, dict):
        with weighted_adapters(model, choice):
            yield
    else:
        raise TypeError(f"cannot activate {choice!r} as one model")


def _uniform(choices: Sequence[Choice]) -> bool:
    return all(c == choices[0] for c in choices) and not isinstance(choices[0], tuple)


@dataclass
class RequestLevelSystem:
    """A system that picks one ``Choice`` per request over a shared PEFT model of all adapters.

    A batch whose requests share a choice runs as one plain forward; a batch mixing single
    adapters uses PEFT's mixed-batch ``adapter_names``; weighted mixtures and best-of run per request.
    """

    name: str
    model: PeftModel
    choose: Callable[[Record], Choice]
    prepare: Callable[[Sequence[Record]], None] = field(default=lambda records: None)

    def _logits(self, batch: Batch, choices: Sequence[Choice]) -> torch.Tensor:
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if _uniform(choices):
            with activated(self.model, choices[0]):
                return self.model(**kwargs).logits
        names = [c or PEFT_BASE for c in choices]
        return self.model(**kwargs, adapter_names=names).logits

    @torch.no_grad()
    def nll(self, batch: Batch, records: Sequence[Record]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example (summed NLL, target tokens) [B]."""
        choices = [self.choose(r) for r in records]
        if _uniform(choices) or all(c is None or isinstance(c, str) for c in choices):
            return batch_nll(self._logits(batch, choices), batch["labels"])
        sums, counts = torch.zeros(len(records)), torch.zeros(len(records), dtype=torch.long)
        for i, choice in enumerate(choices):
            row = {k: v[i : i + 1] for k, v in batch.items()}
            options = choice if isinstance(choice, tuple) else (choice,)
            results = [batch_nll(self._logits(row, [c]), row["labels"]) for c in options]
            best = min(results, key=lambda sn: float(sn[0]))
            sums[i], counts[i] = best[0].cpu()[0], best[1].cpu()[0]
        return sums, counts

    @torch.no_grad()
    def generate(self, batch: Batch, records: Sequence[Record], **gen: Any) -> torch.Tensor:
        """Greedy/sampled generation; mixtures that differ per request need one request at a time."""
        choices = [c[0] if isinstance(c, tuple) else c for c in (self.choose(r) for r in records)]
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], **gen}
        if _uniform(choices):
            with activated(self.model, choices[0]):
                return self.model.generate(**kwargs)
        if any(isinstance(c, dict) for c in choices):
            raise ValueError(f"{self.name}: per-request mixtures generate one request at a time")
        return self.model.generate(**kwargs, adapter_names=[c or PEFT_BASE for c in choices])


@dataclass
class ModelSystem:
    """A system that is one model (MoE-LoRA, X-LoRA, Arrow): the same forward for every request."""

    name: str
    model: Any
    prepare: Callable[[Sequence[Record]], None] = field(default=lambda records: None)

    @torch.no_grad()
    def nll(self, batch: Batch, records: Sequence[Record]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
        return batch_nll(logits, batch["labels"])

    @torch.no_grad()
    def generate(self, batch: Batch, records: Sequence[Record], **gen: Any) -> torch.Tensor:
        return self.model.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **gen
        )


System = Union[RequestLevelSystem, ModelSystem]  # noqa: UP007  (runtime alias)


def shareable_options(choice: Choice) -> tuple[str | None, ...] | None:
    """The single-model options of ``choice`` (one, or several for best-of), or None for a weighted
    mixture: what a request-level system's result can be looked up by, across systems of one run."""
    if isinstance(choice, dict):
        return None
    return choice if isinstance(choice, tuple) else (choice,)


def gold_choice(record: Record, experts: Sequence[str]) -> Choice:
    """The oracle: the gold domain's expert; base for general; the better gold expert for pairs."""
    if record.domain in experts:
        return record.domain
    parts = tuple(d for d in record.domain.split("+") if d in experts)
    if len(parts) > 1:
        return parts
    return parts[0] if parts else None


def gold_label(record: Record, experts: Sequence[str]) -> str:
    """The router's gold label for a single-domain record (``base`` for non-expert domains)."""
    return record.domain if record.domain in experts else "base"
