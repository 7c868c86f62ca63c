"""Length-grouped sampling and padding collation."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from loralab.data.formatting import IGNORE_INDEX, EncodedExample


class EncodedDataset(Dataset[EncodedExample]):
    def __init__(self, examples: Sequence[EncodedExample]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> EncodedExample:
        return self.examples[i]

    @property
    def lengths(self) -> list[int]:
        return [len(e) for e in self.examples]


class LengthGroupedSampler(Sampler[int]):
    """Shuffled order where consecutive ``batch_size`` indices have similar lengths.

    Like Hugging Face's sampler of that name: shuffle, cut into mega-batches of
    ``batch_size * buckets`` indices, sort each by length, then shuffle the batches, so padding
    stays small and batches still vary. ``set_epoch`` (called by Lightning) reshuffles.
    ``resume_at(epoch, batches)`` makes the next pass over ``epoch`` skip its first ``batches``
    batches (a run resumed mid-epoch sees exactly the batches it had not trained on).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, buckets: int = 50, seed: int = 0):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.buckets = max(1, buckets)
        self.seed = seed
        self.epoch = 0
        self._skip: tuple[int, int] | None = None  # (epoch, batches) of a resume

    def resume_at(self, epoch: int, batches: int) -> None:
        self._skip = (epoch, batches)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        mega = self.batch_size * self.buckets
        batches: list[list[int]] = []
        for start in range(0, len(order), mega):
            chunk = sorted(order[start : start + mega], key=lambda i: -self.lengths[i])
            batches.extend(
                chunk[j : j + self.batch_size] for j in range(0, len(chunk), self.batch_size)
            )
        order_of_batches = torch.randperm(len(batches), generator=g).tolist()
        if self._skip is not None and self._skip[0] == self.epoch:
            order_of_batches = order_of_batches[self._skip[1] :]
        self._skip = None
        for b in order_of_batches:
            yield from batches[b]


def collate_examples(
    examples: Sequence[EncodedExample], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples.

    Returns ``input_ids`` [B, T] (padded with ``pad_token_id``), ``attention_mask`` [B, T],
    ``labels`` [B, T] (``IGNORE_INDEX`` on prompt and padding), ``domain_id`` [B] and, when the
    examples carry one, ``prior`` [B, S] (the router's gate-slot probabilities).
    """
    width = max(len(e) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        attention_mask[i, :n] = 1
    domain_id = torch.tensor([e.domain_id for e in examples], dtype=torch.long)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "domain_id": domain_id,
    }
    priors = [e.prior for e in examples]
    if any(p is not None for p in priors):
        if any(p is None for p in priors):
            raise ValueError("a batch mixes examples with and without a router prior")
        batch["prior"] = torch.tensor(priors, dtype=torch.float32)  # [B, S]
    return batch
