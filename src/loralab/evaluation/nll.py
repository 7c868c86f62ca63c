"""Per-example token negative log-likelihood of gold responses."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from loralab.data.formatting import IGNORE_INDEX

Batch = Mapping[str, torch.Tensor]


def batch_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL and count of target tokens per row.

    Args:
        logits: [B, T, V] next-token logits.
        labels: [B, T] token ids, ``IGNORE_INDEX`` where no loss is taken.
    Returns:
        (nll_sum [B], n_tokens [B]), both float32 / int64 on the logits' device.
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shift_labels.shape)
    mask = shift_labels != IGNORE_INDEX
    return (nll * mask).sum(dim=1), mask.sum(dim=1)


@torch.no_grad()
def example_nll(
    forward: Callable[[Batch], torch.Tensor], batches: Iterable[Batch], device: torch.device | str
) -> tuple[np.ndarray, np.ndarray]:
    """Run ``forward(batch) -> logits`` over ``batches``; return per-example (nll_sum, n_tokens)."""
    sums: list[np.ndarray] = []
    counts: list[np.ndarray] = []
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        s, n = batch_nll(forward(batch), batch["labels"])
        sums.append(s.cpu().numpy())
        counts.append(n.cpu().numpy())
    return np.concatenate(sums), np.concatenate(counts)


def mean_token_nll(nll_sum: np.ndarray, n_tokens: np.ndarray) -> float:
    """Token-weighted mean NLL (nats per response token)."""
    total = float(np.sum(n_tokens))
    if total == 0:
        raise ValueError("no target tokens to score")
    return float(np.sum(nll_sum) / total)
