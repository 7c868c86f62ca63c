"""Rows that share a prompt (a question's options) scored with the prompt forwarded once.

A ``PromptGroup`` is the rows of one record id whose tokens before the first scored label are the
same (the options of a question; a cut prompt can differ per option, see ``encode_option``, and
then makes groups of its own). A batch of groups runs two forwards:

1. the prompts, left-padded, KV cache on, only the last position's logits (they score each
   option's first token);
2. the cache gathered once per row of each group (``DynamicCache.batch_select_indices``) and the
   option tokens, right-padded after it (mask over prompt + options, positions continuing each
   prompt), with all their logits (options are a few tokens).

The NLL equals the full rows' (``batch_nll``) up to float rounding. Row routings apply per group
in the prefill and per row (``RowRouting.select``) in the option step; the MoE-LoRA gate reads each
token's own layer input, so the prompt's gate weights do not depend on the option. A model
without a usable KV cache (X-LoRA runs a scaling pass over the whole input first, so PEFT turns
the cache off in its config) keeps full rows: ``uses_kv_cache``.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from loralab.data.formatting import IGNORE_INDEX, EncodedExample
from loralab.evaluation.nll import batch_nll
from loralab.evaluation.sets import EvalSet


@dataclass(frozen=True)
class PromptGroup:
    """Rows (set indices) that share ``prompt`` (token ids) and a record id."""

    prompt: tuple[int, ...]
    rows: tuple[int, ...]


def prompt_length(example: EncodedExample) -> int:
    """Tokens before the first scored label (at least 1: a label at position 0 is never scored)."""
    first = next((k for k, t in enumerate(example.labels) if t != IGNORE_INDEX), len(example))
    return max(1, first)


def prompt_groups(eval_set: EvalSet) -> list[PromptGroup]:
    """The set's rows grouped by (record id, prompt tokens), in first-row order."""
    groups: dict[tuple[str, tuple[int, ...]], list[int]] = {}
    for i, (record, example) in enumerate(zip(eval_set.records, eval_set.examples, strict=True)):
        prompt = tuple(example.input_ids[: prompt_length(example)])
        groups.setdefault((record.id, prompt), []).append(i)
    return [PromptGroup(prompt, tuple(rows)) for (_, prompt), rows in groups.items()]


def group_batches(groups: Sequence[PromptGroup], batch_size: int) -> Iterator[list[PromptGroup]]:
    """Groups in prompt length order (little padding), packed up to ``batch_size`` rows per
    batch (the option step's rows; a group larger than that goes alone)."""
    batch: list[PromptGroup] = []
    rows = 0
    for group in sorted(groups, key=lambda g: -len(g.prompt)):
        if batch and rows + len(group.rows) > batch_size:
            yield batch
            batch, rows = [], 0
        batch.append(group)
        rows += len(group.rows)
    if batch:
        yield batch


def uses_kv_cache(model: Any) -> bool:
    """Whether ``model`` runs with a KV cache: its config's ``use_cache`` (X-LoRA turns it off)."""
    config = getattr(model, "config", None)
    return bool(getattr(config, "use_cache", False))


def _cache_arg(model: Any) -> str:
    """transformers 5 names the KV cache argument ``cache`` (``past_key_values`` before)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(inner, "base_model", inner)  # MoELoraModel -> the causal LM
    forward = inspect.signature(inner.forward).parameters
    return "cache" if "cache" in forward else "past_key_values"


def score_groups(
    model: Any,
    examples: Sequence[EncodedExample],
    groups: Sequence[PromptGroup],
    pad_id: int,
    device: torch.device,
    routing: Any = None,
) -> tuple[list[int], torch.Tensor, torch.Tensor, int]:
    """Score every row of ``groups`` with each prompt forwarded once (see the module docstring).

    ``routing``: a ``RowRouting`` with one row per group (passed as ``row_routing``), or None.
    Returns (rows, nll_sum [R], n_tokens [R], tokens forwarded without padding), rows in group
    order.
    """
    cache_arg = _cache_arg(model)
    extra = {} if routing is None else {"row_routing": routing}
    width = max(len(g.prompt) for g in groups)
    ids = torch.full((len(groups), width), pad_id, dtype=torch.long)  # [G, P], left-padded
    mask = torch.zeros(len(groups), width, dtype=torch.long)
    for k, g in enumerate(groups):
        ids[k, width - len(g.prompt) :] = torch.as_tensor(g.prompt)
        mask[k, width - len(g.prompt) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    with torch.no_grad():
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(1) - 1).clamp(min=0),
            use_cache=True,
            logits_to_keep=1,
            **extra,
        )
    cache = getattr(out, cache_arg)
    first = out.logits[:, -1]  # [G, V]: predicts each option's first token

    rows = [i for g in groups for i in g.rows]
    owner = torch.tensor([k for k, g in enumerate(groups) for _ in g.rows], device=device)  # [R]
    tails = [examples[i].input_ids[len(g.prompt) :] for g in groups for i in g.rows]
    tail_labels = [examples[i].labels[len(g.prompt) :] for g in groups for i in g.rows]
    span = max(1, max(len(t) for t in tails))
    tail_ids = torch.full((len(rows), span), pad_id, dtype=torch.long)  # [R, A], right-padded
    labels = torch.full((len(rows), 1 + span), IGNORE_INDEX, dtype=torch.long)  # [R, 1+A]
    tail_mask = torch.zeros(len(rows), span, dtype=torch.long)
    for r, (tail, label) in enumerate(zip(tails, tail_labels, strict=True)):
        tail_ids[r, : len(tail)] = torch.as_tensor(tail, dtype=torch.long)
        labels[r, 1 : 1 + len(label)] = torch.as_tensor(label, dtype=torch.long)
        tail_mask[r, : len(tail)] = 1
    tail_ids, tail_mask, labels = tail_ids.to(device), tail_mask.to(device), labels.to(device)
    start = torch.tensor([len(g.prompt) for g in groups], device=device)[owner]  # [R]
    positions = start[:, None] + torch.arange(span, device=device)  # [R, A]
    cache.batch_select_indices(owner)  # each group's prompt once per row
    if routing is not None:
        extra = {"row_routing": routing.select(owner)}
    with torch.no_grad():
        tail_logits = model(
            input_ids=tail_ids,
            attention_mask=torch.cat([mask.index_select(0, owner), tail_mask], 1),  # [R, P+A]
            position_ids=positions,
            use_cache=True,
            **{cache_arg: cache},
            **extra,
        ).logits  # [R, A, V]
    logits = torch.cat([first.index_select(0, owner)[:, None], tail_logits], 1)  # [R, 1+A, V]
    sums, counts = batch_nll(logits, labels)
    tokens = sum(len(g.prompt) for g in groups) + sum(len(t) for t in tails)
    return rows, sums, counts, tokens
