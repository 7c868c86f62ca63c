"""The expert x domain table of held-out mean token NLL, with the base model's row."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from loralab.data.datamodule import DomainDataModule
from loralab.evaluation.nll import Batch, example_nll, mean_token_nll
from loralab.io_utils import atomic_write_json, atomic_write_text


def nll_matrix(
    model: PeftModel,
    loaders: Mapping[str, DomainDataModule],
    experts: Sequence[str],
    split: str = "test",
) -> dict[str, dict[str, float]]:
    """``table[row][domain]`` = mean token NLL on ``domain``'s ``split``; rows ``base`` + experts.

    ``model`` holds every expert as a named adapter; ``base`` runs with adapters disabled.
    """
    device = next(model.parameters()).device

    def forward(batch: Batch) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    table: dict[str, dict[str, float]] = {}
    for row in ["base", *experts]:
        table[row] = {}
        for domain, dm in loaders.items():
            batches = dm.eval_dataloader(split)  # type: ignore[arg-type]
            if row == "base":
                with model.disable_adapter():
                    s, n = example_nll(forward, batches, device)
            else:
                model.set_adapter(row)
                s, n = example_nll(forward, batches, device)
            table[row][domain] = mean_token_nll(s, n)
    return table


def format_table(table: Mapping[str, Mapping[str, float]]) -> str:
    """Markdown table, rows = model, columns = domain; the best (lowest) of each column in bold."""
    domains = list(next(iter(table.values())))
    best = {d: min(row[d] for row in table.values()) for d in domains}
    lines = [
        "| model \\ test domain | " + " | ".join(domains) + " |",
        "|---" * (len(domains) + 1) + "|",
    ]
    for name, row in table.items():
        cells = [f"**{row[d]:.3f}**" if row[d] == best[d] else f"{row[d]:.3f}" for d in domains]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def experts_beat_base(table: Mapping[str, Mapping[str, float]]) -> dict[str, bool]:
    return {d: table[d][d] < table["base"][d] for d in table if d != "base" and d in table["base"]}


def save_table(
    table: Mapping[str, Mapping[str, float]], out_dir: str | Path, extra: dict[str, Any]
) -> None:
    """``expert_check.json`` (table + extra) and ``expert_check.csv`` (row, domain, nll)."""
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "expert_check.json", {"mean_token_nll": table, **extra})
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["model", "domain", "mean_token_nll"])
    for name, row in table.items():
        for domain, value in row.items():
            writer.writerow([name, domain, f"{value:.6f}"])
    atomic_write_text(out_dir / "expert_check.csv", buf.getvalue())
