"""Per-example NLL of every system on every set, each forward run once.

Routed systems share one MoE-LoRA model: the single choices (base, each expert) are scored once
per example into a table (rows needing different choices go in one mixed batch), and the base,
single-expert, oracle and router systems read their results from it; only weighted mixtures and
the gate run forwards of their own. MoE-LoRA's gate statistics are recorded during its own
scoring pass. Logits are computed only from the position before the batch's first scored token
on (``logits_to_keep``) and the loss one row at a time, so a batch holds [B, K, V] logits and
[K, V] temporaries, not the vocabulary over every prompt token. Sets whose rows repeat a prompt
(``EvalSet.shared_prompts``: multiple-choice options) forward each question's prompt once per
choice and only the options after its KV cache (``prefix.py``; not X-LoRA, which has no cache).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from loralab.evaluation.nll import batch_nll, scored_positions
from loralab.evaluation.prefix import (
    PromptGroup,
    group_batches,
    prompt_groups,
    score_groups,
    uses_kv_cache,
)
from loralab.evaluation.sets import EvalSet
from loralab.evaluation.systems import (
    ModelSystem,
    RoutedSystem,
    SingleChoice,
    pending_rounds,
    row_routing,
    single_options,
    uses_gate,
)

Batch = dict[str, torch.Tensor]
Scored = dict[str, list]  # {"nll_sum": [float], "n_tokens": [int]}, in the set's record order


def select_rows(batch: Mapping[str, torch.Tensor], rows: Sequence[int]) -> Batch:
    """Rows of a right-padded batch, cut to the longest of them."""
    index = torch.as_tensor(list(rows), device=batch["input_ids"].device)
    width = int(batch["attention_mask"].index_select(0, index).sum(1).max())
    rows_of = {k: v.index_select(0, index) for k, v in batch.items()}
    return {k: v[:, :width] if v.ndim == 2 else v for k, v in rows_of.items()}


class GateRecorder:
    """MoE-LoRA's applied weights on the response tokens of each set (mean over layers), and
    per-token heatmaps of the first two-domain examples, from the scoring pass."""

    def __init__(self, slots: Sequence[str], heatmap_examples: int, tokenizer: Any) -> None:
        self.slots = list(slots)
        self.heatmap_examples = heatmap_examples
        self.tokenizer = tokenizer
        self._total: dict[str, torch.Tensor] = {}
        self._count: dict[str, int] = {}
        self._heatmaps: dict[int, dict[str, Any]] = {}

    def add(
        self, eval_set: EvalSet, indices: Sequence[int], batch: Batch, weights: torch.Tensor
    ) -> None:
        """weights [L, B*T, S] of one recorded forward over ``batch`` (rows = ``indices``)."""
        b, t = batch["input_ids"].shape
        w = weights.float().mean(0).view(b, t, -1).cpu()  # [B, T, S]
        mask = (batch["labels"] != -100).cpu()
        total = self._total.setdefault(eval_set.name, torch.zeros(len(self.slots)))
        total += w[mask].sum(0)
        self._count[eval_set.name] = self._count.get(eval_set.name, 0) + int(mask.sum())
        if eval_set.name != "two_domain":
            return
        for row, i in enumerate(indices):
            if i < self.heatmap_examples:
                example = eval_set.examples[i]
                start = next(k for k, label in enumerate(example.labels) if label != -100)
                self._heatmaps[i] = {
                    "tokens": [self.tokenizer.decode([t]) for t in example.input_ids[start:]],
                    "weights": w[row, start : len(example.input_ids)].tolist(),
                    "domains": eval_set.records[i].domain.split("+"),
                }

    def summary(self) -> dict[str, Any]:
        usage = {
            name: {
                s: float(v)
                for s, v in zip(self.slots, total / max(1, self._count[name]), strict=True)
            }
            for name, total in self._total.items()
        }
        heatmaps = [self._heatmaps[i] for i in sorted(self._heatmaps)]
        return {"experts": self.slots, "gate_usage": usage, "heatmaps": heatmaps}


class RoutedScorer:
    """Scores routed systems on the shared MoE-LoRA ``model`` (see the module docstring).

    Work goes in units of prompt groups (``prefix.py``): a set with ``shared_prompts`` (option
    rows) in batches of its questions, each prompt forwarded once per choice; any other set in
    batches of single rows. ``forwards`` and ``tokens`` (input tokens without padding) count what
    ran."""

    def __init__(
        self,
        model: Any,
        sets: Mapping[str, EvalSet],
        batch_size: int,
        pad_id: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.sets = sets
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.device = device
        # (set, example index, single choice) -> (summed NLL, target tokens)
        self.table: dict[tuple[str, int, SingleChoice], tuple[float, int]] = {}
        self.forwards = 0
        self.tokens = 0
        self._groups: dict[str, list[PromptGroup]] = {}  # set name -> its prompt groups

    def _units(self, eval_set: EvalSet) -> Iterator[tuple[list[PromptGroup], Batch | None]]:
        """(groups, their right-padded batch) per batch; the batch is None for shared prompts."""
        if eval_set.shared_prompts:
            if eval_set.name not in self._groups:
                self._groups[eval_set.name] = prompt_groups(eval_set)
            for groups in group_batches(self._groups[eval_set.name], self.batch_size):
                yield groups, None
            return
        for idx, batch, _ in eval_set.batches(self.batch_size, self.pad_id, self.device):
            yield [PromptGroup((), (i,)) for i in idx], batch

    def _forward(self, batch: Batch, choices: Sequence[Any], recording: bool = False) -> Any:
        routing = row_routing(choices, self.model.expert_names, self.device)
        self.forwards += 1
        self.tokens += int(batch["attention_mask"].sum())
        with torch.no_grad():
            out = self.model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                row_routing=routing,
                use_cache=False,
                logits_to_keep=scored_positions(batch["labels"]),
            )
        return out.logits, (self.model.gate_trace().weights if recording else None)

    def _run(
        self,
        eval_set: EvalSet,
        groups: Sequence[PromptGroup],
        batch: Batch | None,
        chosen: Sequence[int],
        choices: Sequence[Any],
        recorder: GateRecorder | None = None,
    ) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """Score ``groups[chosen]``, one choice each, in one mixed batch: (rows, nll_sum,
        n_tokens). Gate rows of a full-row batch are recorded into ``recorder`` when given."""
        if batch is None:
            routing = row_routing(choices, self.model.expert_names, self.device)
            rows, sums, counts, tokens = score_groups(
                self.model,
                eval_set.examples,
                [groups[p] for p in chosen],
                self.pad_id,
                self.device,
                routing,
            )
            self.forwards += 2
            self.tokens += tokens
            return rows, sums, counts
        rows = [groups[p].rows[0] for p in chosen]
        sub = select_rows(batch, chosen)
        gated = [k for k, c in enumerate(choices) if uses_gate(c)]
        if recorder is None or not gated:
            logits, _ = self._forward(sub, choices)
            return (rows, *batch_nll(logits, sub["labels"]))
        with self.model.recording():
            logits, weights = self._forward(sub, choices, recording=True)
        index = torch.as_tensor(gated)
        t = sub["input_ids"].shape[1]
        per_row = weights.view(weights.shape[0], len(chosen), t, -1)[:, index]  # [L, G, T, S]
        recorder.add(
            eval_set,
            [rows[k] for k in gated],
            {k: v.index_select(0, index) for k, v in sub.items()},
            per_row.reshape(weights.shape[0], -1, weights.shape[-1]),
        )
        return (rows, *batch_nll(logits, sub["labels"]))

    def fill(self, systems: Sequence[RoutedSystem]) -> None:
        """Score, once per example, every single choice any of ``systems`` reads."""
        for eval_set in self.sets.values():
            wanted: list[list[SingleChoice]] = [[] for _ in eval_set.records]
            for system in systems:
                for i, record in enumerate(eval_set.records):
                    for option in single_options(system.choose(record)) or ():
                        if option not in wanted[i]:
                            wanted[i].append(option)
            for groups, batch in self._units(eval_set):
                needs = [
                    [
                        o
                        for o in dict.fromkeys(o for i in g.rows for o in wanted[i])
                        if any((eval_set.name, i, o) not in self.table for i in g.rows)
                    ]
                    for g in groups
                ]
                for chosen, options in pending_rounds(needs):
                    rows, sums, counts = self._run(eval_set, groups, batch, chosen, options)
                    per_row = [
                        o for p, o in zip(chosen, options, strict=True) for _ in groups[p].rows
                    ]
                    for i, option, s, c in zip(rows, per_row, sums, counts, strict=True):
                        self.table[(eval_set.name, i, option)] = (float(s), int(c))

    def score(
        self, system: RoutedSystem, recorder: GateRecorder | None = None
    ) -> dict[str, Scored]:
        """Per-example NLL of ``system`` on every set: single choices from the table (best-of:
        the lowest), the other rows (mixtures, the gate) in one mixed batch per unit. Gate rows
        of full-row sets are recorded into ``recorder`` when given."""
        self.fill([system])
        out: dict[str, Scored] = {}
        for eval_set in self.sets.values():
            n = len(eval_set.records)
            sums, counts = np.zeros(n), np.zeros(n, dtype=np.int64)
            choices = [system.choose(r) for r in eval_set.records]
            for units, batch in self._units(eval_set):
                groups = units if batch is not None else _by_choice(units, choices)
                own = []
                for p, group in enumerate(groups):
                    options = single_options(choices[group.rows[0]])
                    if options is None:
                        own.append(p)
                        continue
                    for i in group.rows:
                        best = min((self.table[(eval_set.name, i, o)] for o in options), key=_nll)
                        sums[i], counts[i] = best
                if not own:
                    continue
                own_choices = [choices[groups[p].rows[0]] for p in own]
                rows, s, c = self._run(eval_set, groups, batch, own, own_choices, recorder)
                for k, i in enumerate(rows):
                    sums[i], counts[i] = float(s[k]), int(c[k])
            out[eval_set.name] = {"nll_sum": sums.tolist(), "n_tokens": counts.tolist()}
        return out


def _by_choice(groups: Sequence[PromptGroup], choices: Sequence[Any]) -> list[PromptGroup]:
    """Each group split into runs of rows with equal choices (a group shares one routing)."""
    out = []
    for group in groups:
        parts: list[tuple[Any, list[int]]] = []
        for i in group.rows:
            for choice, rows in parts:
                if choice == choices[i]:
                    rows.append(i)
                    break
            else:
                parts.append((choices[i], [i]))
        out += [PromptGroup(group.prompt, tuple(rows)) for _, rows in parts]
    return out


def _nll(result: tuple[float, int]) -> float:
    return result[0]


@torch.no_grad()
def score_model(
    system: ModelSystem,
    sets: Mapping[str, EvalSet],
    batch_size: int,
    pad_id: int,
    device: torch.device,
) -> dict[str, Scored]:
    """Per-example NLL of a PEFT system (one forward per batch) on every set; a set with
    ``shared_prompts`` forwards each prompt once when the model has a KV cache (not X-LoRA)."""
    out: dict[str, Scored] = {}
    for eval_set in sets.values():
        n = len(eval_set.records)
        sums, counts = np.zeros(n), np.zeros(n, dtype=np.int64)
        if eval_set.shared_prompts and uses_kv_cache(system.model):
            for groups in group_batches(prompt_groups(eval_set), batch_size):
                rows, s, c, _ = score_groups(
                    system.model, eval_set.examples, groups, pad_id, device
                )
                sums[rows], counts[rows] = s.float().cpu().numpy(), c.cpu().numpy()
            out[eval_set.name] = {"nll_sum": sums.tolist(), "n_tokens": counts.tolist()}
            continue
        for idx, batch, _ in eval_set.batches(batch_size, pad_id, device):
            logits = system.model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                logits_to_keep=scored_positions(batch["labels"]),
            ).logits
            s, c = batch_nll(logits, batch["labels"])
            sums[idx], counts[idx] = s.float().cpu().numpy(), c.cpu().numpy()
        out[eval_set.name] = {"nll_sum": sums.tolist(), "n_tokens": counts.tolist()}
    return out
