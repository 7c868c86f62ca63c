"""Greedy generation on a small sample: MBPP pass rate for ``code`` (the model's code runs in the
guarded sandbox of ``loralab.evaluation.sandbox``), ROUGE-L against the reference for every other
expert domain.

Prompts are generated in left-padded batches. Routed systems share one MoE-LoRA model: each single
choice (base, one expert) generates once per prompt, in mixed batches, and every system that picks
it reuses the reply (best-of serves its first option); mixtures and the gate generate their own."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from loralab.data.formatting import prompt_text
from loralab.data.records import Record, data_root, load_domain_split, spread_subset
from loralab.evaluation.benchmarks import humaneval_records
from loralab.evaluation.options import rate_metrics
from loralab.evaluation.sandbox import run_checks
from loralab.evaluation.stats import rouge_l
from loralab.evaluation.systems import (
    ModelSystem,
    RoutedSystem,
    SingleChoice,
    pending_rounds,
    row_routing,
    single_options,
)

__all__ = ["GenerationItem", "Generator", "extract_code", "generation_sets", "run_checks"]

_CODE_BLOCK = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.DOTALL)


@dataclass(frozen=True)
class GenerationItem:
    """A prompt with either a reference answer (ROUGE-L) or executable checks (pass rate): MBPP's
    assert lines, or HumanEval's ``check(candidate)`` source called on ``entry_point``."""

    record: Record
    tests: Sequence[str] = field(default_factory=tuple)
    setup: str = ""
    entry_point: str | None = None


def mbpp_items(data_cfg: Mapping[str, Any], n: int) -> list[GenerationItem]:
    """``n`` MBPP test-split tasks (ids 11-510) from ``eval/``, spread over the file."""
    path = data_root(data_cfg) / "eval" / "mbpp_test_and_validation.jsonl"
    items = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            obj = json.loads(line)
            if not isinstance(obj.get("test_list"), list):
                raise ValueError(
                    f"{path}:{lineno}: field 'test_list' must be a list of assert lines"
                )
            task = int(str(obj["id"]).rsplit("-", 1)[-1])
            if 11 <= task <= 510:
                record = Record(obj["id"], "code", obj["instruction"], obj["response"])
                items.append(
                    GenerationItem(
                        record, tuple(obj["test_list"]), obj.get("test_setup_code") or ""
                    )
                )
    return [items[int(i * len(items) / n)] for i in range(min(n, len(items)))]


PROGRAM_DOMAIN = "code"  # the domain MBPP is about: scored by running the programs


def humaneval_items(data_cfg: Mapping[str, Any], path: str, n: int) -> list[GenerationItem]:
    """``n`` HumanEval problems: the prompt (signature and docstring) runs first as setup, so a
    reply with the whole function replaces its stub and a reply with the body alone completes it;
    then ``check(entry_point)``."""
    return [
        GenerationItem(p["record"], (p["test"],), p["record"].instruction, p["entry_point"])
        for p in humaneval_records(data_cfg, path, n)
    ]


def generation_sets(
    data_cfg: Mapping[str, Any],
    n: int,
    domains: Sequence[str],
    mbpp: int | None = None,
    humaneval: int = 0,
    humaneval_path: str = "eval/humaneval.jsonl",
) -> dict[str, list[GenerationItem]]:
    """``gen_<domain>`` per expert domain: MBPP pass rate for ``code`` (``mbpp`` problems, default
    ``n``), test split ROUGE-L else; ``humaneval`` (pass rate) when ``humaneval`` > 0; empty sets
    are left out."""
    sets = {}
    for domain in domains:
        if domain == PROGRAM_DOMAIN:
            sets[f"gen_{domain}"] = mbpp_items(data_cfg, n if mbpp is None else mbpp)
            continue
        records = spread_subset(load_domain_split(data_cfg, domain, "test", limit=None), n)
        sets[f"gen_{domain}"] = [GenerationItem(r) for r in records]
    if humaneval > 0:
        sets["humaneval"] = humaneval_items(data_cfg, humaneval_path, humaneval)
    return {name: items for name, items in sets.items() if items}


def extract_code(text: str) -> str:
    """The first fenced code block of a reply, or the whole reply when it has none."""
    match = _CODE_BLOCK.search(text)
    return match.group(1) if match else text


def prompt_ids(
    tokenizer: PreTrainedTokenizerBase, instruction: str, max_prompt_tokens: int
) -> list[int]:
    """Prompt ids (chat template, generation header), keeping the last ``max_prompt_tokens``."""
    ids = tokenizer(prompt_text(tokenizer, instruction), add_special_tokens=False)["input_ids"]
    return list(ids[-max_prompt_tokens:])


def left_pad(
    rows: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """``input_ids`` / ``attention_mask`` [B, T], padded on the left (the side generation appends)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


Reply = dict[str, Any]  # {"id", "reply", "score"}


class Generator:
    """Greedy replies and their scores for every system on the generation sets."""

    def __init__(
        self,
        sets: Mapping[str, Sequence[GenerationItem]],
        tokenizer: PreTrainedTokenizerBase,
        gen_cfg: Mapping[str, Any],
        batch_size: int,
        device: torch.device,
    ) -> None:
        self.sets = sets
        self.tokenizer = tokenizer
        self.max_new_tokens = int(gen_cfg["max_new_tokens"])
        self.timeout_s = float(gen_cfg["timeout_s"])
        self.batch_size = batch_size
        self.device = device
        self.prompts = {
            name: [
                prompt_ids(tokenizer, item.record.instruction, int(gen_cfg["max_prompt_tokens"]))
                for item in items
            ]
            for name, items in sets.items()
        }
        # (set, item index, single choice) -> scored reply, shared by the routed systems
        self.table: dict[tuple[str, int, SingleChoice], Reply] = {}

    def _chunks(self, n: int) -> list[list[int]]:
        return [list(range(i, min(n, i + self.batch_size))) for i in range(0, n, self.batch_size)]

    def _generate(
        self, run: Callable[..., torch.Tensor], set_name: str, indices: Sequence[int]
    ) -> list[Reply]:
        batch = left_pad([self.prompts[set_name][i] for i in indices], self._pad, self.device)
        with torch.no_grad():
            out = run(
                **batch,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                pad_token_id=self._pad,
                eos_token_id=self.tokenizer.eos_token_id,
            )
        width = batch["input_ids"].shape[1]
        replies = []
        for row, i in enumerate(indices):
            item = self.sets[set_name][i]
            text = str(self.tokenizer.decode(out[row, width:], skip_special_tokens=True))
            reply = {"id": item.record.id, "reply": text, "score": self._score(item, text)}
            if item.tests:
                reply["passed"] = bool(reply["score"])
            replies.append(reply)
        return replies

    @property
    def _pad(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def _score(self, item: GenerationItem, reply: str) -> float:
        if item.tests:
            code = extract_code(reply)
            return float(run_checks(code, item.tests, item.setup, self.timeout_s, item.entry_point))
        return rouge_l(reply, item.record.response)

    def routed(self, model: Any, system: RoutedSystem) -> dict[str, list[Reply]]:
        """Replies of a routed system on the shared MoE-LoRA ``model``."""

        def run_with(choices: Sequence[Any]) -> Callable[..., torch.Tensor]:
            routing = row_routing(choices, model.expert_names, self.device)
            return lambda **kw: model.generate(**kw, row_routing=routing)

        out: dict[str, list[Reply]] = {}
        for set_name, items in self.sets.items():
            choices = [system.choose(item.record) for item in items]
            replies: list[Reply | None] = [None] * len(items)
            for chunk in self._chunks(len(items)):
                needs: list[list[SingleChoice]] = []
                for i in chunk:
                    options = single_options(choices[i])
                    first = None if options is None else options[0]
                    key = (set_name, i, first)
                    needs.append([first] if options is not None and key not in self.table else [])
                for rows, firsts in pending_rounds(needs):
                    indices = [chunk[r] for r in rows]
                    for i, first, reply in zip(
                        indices,
                        firsts,
                        self._generate(run_with(firsts), set_name, indices),
                        strict=True,
                    ):
                        self.table[(set_name, i, first)] = reply
                own = [i for i in chunk if single_options(choices[i]) is None]
                if own:
                    run = run_with([choices[i] for i in own])
                    for i, reply in zip(own, self._generate(run, set_name, own), strict=True):
                        replies[i] = reply
                for i in chunk:
                    options = single_options(choices[i])
                    if options is not None:
                        replies[i] = self.table[(set_name, i, options[0])]
            out[set_name] = [r for r in replies if r is not None]
        return out

    def model(self, system: ModelSystem) -> dict[str, list[Reply]]:
        """Replies of a PEFT system, one batched generate per chunk."""
        out: dict[str, list[Reply]] = {}
        for set_name, items in self.sets.items():
            out[set_name] = [
                reply
                for chunk in self._chunks(len(items))
                for reply in self._generate(system.model.generate, set_name, chunk)
            ]
        return out


def generation_metrics(
    system: str,
    replies: Mapping[str, Sequence[Reply]],
    bootstrap: tuple[int, int, float] | None = None,
) -> list[dict[str, Any]]:
    """``pass_rate`` (greedy pass@1) where the replies ran checks, ``rougeL`` elsewhere: the mean
    score of the replies; pass rates get a bootstrap interval over problems when ``bootstrap``
    (n, seed, alpha) is given."""
    out = []
    for set_name, scored in replies.items():
        if scored and "passed" in scored[0]:
            passed = [int(r["passed"]) for r in scored]
            if bootstrap is not None:
                out += rate_metrics(system, set_name, {"pass_rate": passed}, *bootstrap)
                continue
        out.append(
            {
                "system": system,
                "set": set_name,
                "metric": "pass_rate" if scored and "passed" in scored[0] else "rougeL",
                "value": float(np.mean([r["score"] for r in scored])),
                "ci_low": None,
                "ci_high": None,
            }
        )
    return out
