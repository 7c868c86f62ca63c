"""Greedy generation on a small sample: MBPP pass rate for code (the model's code runs in the guarded
sandbox of ``loralab.evaluation.sandbox``), ROUGE-L against the reference for law and medical."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from loralab.data.formatting import prompt_text
from loralab.data.records import Record, data_root, load_domain_split, spread_subset
from loralab.evaluation.sandbox import run_checks

__all__ = ["GenerationItem", "extract_code", "generate_reply", "generation_sets", "run_checks"]

_CODE_BLOCK = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.DOTALL)


@dataclass(frozen=True)
class GenerationItem:
    """A prompt with either a reference answer (ROUGE-L) or executable checks (pass rate)."""

    record: Record
    tests: Sequence[str] = field(default_factory=tuple)
    setup: str = ""


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


def generation_sets(data_cfg: Mapping[str, Any], n: int) -> dict[str, list[GenerationItem]]:
    """``gen_code`` (MBPP pass rate), ``gen_law`` and ``gen_medical`` (test split, ROUGE-L)."""
    sets = {"gen_code": mbpp_items(data_cfg, n)}
    for domain in ("law", "medical"):
        records = spread_subset(load_domain_split(data_cfg, domain, "test", limit=None), n)
        sets[f"gen_{domain}"] = [GenerationItem(r) for r in records]
    return sets


def extract_code(text: str) -> str:
    """The first fenced code block of a reply, or the whole reply when it has none."""
    match = _CODE_BLOCK.search(text)
    return match.group(1) if match else text


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, instruction: str, max_prompt_tokens: int
) -> torch.Tensor:
    """[1, T] prompt ids (chat template, generation header), keeping the last ``max_prompt_tokens``."""
    ids = tokenizer(prompt_text(tokenizer, instruction), add_special_tokens=False)["input_ids"]
    return torch.tensor([ids[-max_prompt_tokens:]])


def generate_reply(
    system: Any,
    tokenizer: PreTrainedTokenizerBase,
    item: GenerationItem,
    max_new_tokens: int,
    max_prompt_tokens: int,
    device: torch.device,
) -> str:
    """Greedy reply of ``system`` to one item."""
    ids = encode_prompt(tokenizer, item.record.instruction, max_prompt_tokens).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    out = system.generate(
        batch,
        [item.record],
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
