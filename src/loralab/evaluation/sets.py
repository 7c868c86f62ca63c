"""The evaluation sets: the single-domain test splits (each expert's domain and ``general``) and
the two-domain requests (every pair of the experts' domains)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from loralab.data.batching import collate_examples
from loralab.data.formatting import EncodedExample, encode_pair
from loralab.data.mixtures import two_domain_records
from loralab.data.records import Record, load_domain_split
from loralab.evaluation.benchmarks import extra_sets


@dataclass(frozen=True)
class EvalSet:
    """Records and their encodings, aligned by index. ``shared_prompts``: rows repeat prompts
    (a question's options), so scorers forward each prompt once (``prefix.py``)."""

    name: str
    records: list[Record]
    examples: list[EncodedExample]
    shared_prompts: bool = False

    def batches(
        self, batch_size: int, pad_token_id: int, device: torch.device
    ) -> Iterator[tuple[list[int], dict[str, torch.Tensor], list[Record]]]:
        """(indices, batch, records) in length order (little padding); indices map back to the set."""
        order = sorted(range(len(self.examples)), key=lambda i: -len(self.examples[i]))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = collate_examples([self.examples[i] for i in idx], pad_token_id)
            yield idx, {k: v.to(device) for k, v in batch.items()}, [self.records[i] for i in idx]


EACH_DOMAIN = "domains"  # in eval.sets: one set per domain of data.domains


def expand_sets(names: Sequence[str], domains: Sequence[str]) -> list[str]:
    """``eval.sets`` with ``domains`` replaced by each of ``domains``."""
    out: list[str] = []
    for name in names:
        for n in list(domains) if name == EACH_DOMAIN else [name]:
            if n not in out:
                out.append(n)
    return out


def build_eval_sets(
    data_cfg: Mapping[str, Any],
    eval_cfg: Mapping[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    experts: Sequence[str],
) -> dict[str, EvalSet]:
    """``eval_cfg.sets`` (``expand_sets``) from the test splits: domain names, ``general`` and
    ``two_domain`` (every pair of ``experts``); then ``eval_cfg.extra_sets`` of kind ``nll``."""
    sets: dict[str, EvalSet] = {}
    for name in expand_sets([str(n) for n in eval_cfg["sets"]], experts):
        if name == "two_domain":
            records = two_domain_records(
                data_cfg,
                experts,
                int(eval_cfg["two_domain"]["per_pair"]),
                int(eval_cfg["two_domain"]["max_chars_per_part"]),
            )
            max_length = int(eval_cfg["two_domain"]["max_length"])
        else:
            records = load_domain_split(
                data_cfg, str(name), "test", limit=eval_cfg.get("max_per_set")
            )
            max_length = int(data_cfg["max_length"])
        examples = [encode_pair(tokenizer, r.instruction, r.response, max_length) for r in records]
        sets[str(name)] = EvalSet(str(name), records, examples)
    _, extra = extra_sets(data_cfg, eval_cfg.get("extra_sets") or (), list(sets))
    for name, records in extra.items():  # eval.extra_sets of kind nll
        examples = [
            encode_pair(tokenizer, r.instruction, r.response, int(data_cfg["max_length"]))
            for r in records
        ]
        sets[name] = EvalSet(name, records, examples)
    return sets
