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
        logits: [B, K, V] next-token logits of the last K positions (K <= T; see
            ``scored_positions``).
        labels: [B, T] token ids, ``IGNORE_INDEX`` where no loss is taken.
    Returns:
        (nll_sum [B], n_tokens [B]), both float32 / int64 on the logits' device.
    """
    labels = labels[:, labels.shape[1] - logits.shape[1] :]  # [B, K], aligned with the logits
    targets = labels[:, 1:]  # [B, K-1]: position k predicts token k+1
    sums = torch.stack(
        [  # one row at a time: the log-softmax temporaries are [K, V], not [B, K, V]
            F.cross_entropy(
                logits[b, :-1].float(), targets[b], ignore_index=IGNORE_INDEX, reduction="sum"
            )
            for b in range(logits.shape[0])
        ]
    )
    return sums, (targets != IGNORE_INDEX).sum(dim=1)


def scored_positions(labels: torch.Tensor) -> int:
    """How many last positions' logits ``batch_nll`` needs for ``labels`` [B, T]: from the one
    before the first scored token of any row to the end (pass as ``logits_to_keep``)."""
    scored = labels[:, 1:] != IGNORE_INDEX  # [B, T-1]
    rows = scored.any(dim=1)
    if not bool(rows.any()):
        return 1
    first = int(scored.int().argmax(dim=1)[rows].min())  # predicted by position `first`
    return labels.shape[1] - first


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
