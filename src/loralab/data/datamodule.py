"""Lightning DataModule over the domain files: split, format, tokenize, batch."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

import lightning as L
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from loralab.data.batching import EncodedDataset, LengthGroupedSampler, collate_examples
from loralab.data.formatting import encode_pair
from loralab.data.records import Record, Split, load_domain_split


class DomainDataModule(L.LightningDataModule):
    """Train / val / test loaders over one or several domains.

    Batches are dicts from :func:`collate_examples`; ``domain_id`` indexes ``domains``.
    ``row_prior`` (record -> gate-slot probabilities) adds a ``prior`` [B, S] to every batch.
    """

    def __init__(
        self,
        data_cfg: Mapping[str, Any],
        tokenizer: PreTrainedTokenizerBase,
        domains: Sequence[str],
        seed: int = 0,
        row_prior: Callable[[Record], tuple[float, ...]] | None = None,
    ) -> None:
        super().__init__()
        self.row_prior = row_prior
        self.cfg = data_cfg
        self.tokenizer = tokenizer
        self.domains = list(domains)
        self.seed = seed
        self.datasets: dict[Split, EncodedDataset] = {}
        self._resume: dict[str, int] = {}

    def state_dict(self) -> dict[str, Any]:
        """Where training is in the current epoch (saved in checkpoints): the batches done."""
        trainer = self.trainer
        if trainer is None:
            return {}
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        batches = getattr(progress, "processed", progress.completed)  # typed as the base tracker
        return {"epoch": int(trainer.current_epoch), "batches": int(batches)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume = {k: int(v) for k, v in state_dict.items()}

    def encode(self, split: Split) -> EncodedDataset:
        if split not in self.datasets:
            examples = []
            for i, domain in enumerate(self.domains):
                for r in load_domain_split(self.cfg, domain, split):
                    ex = encode_pair(
                        self.tokenizer, r.instruction, r.response, int(self.cfg["max_length"]), i
                    )
                    examples.append(
                        ex if self.row_prior is None else replace(ex, prior=self.row_prior(r))
                    )
            self.datasets[split] = EncodedDataset(examples)
        return self.datasets[split]

    def records(self, split: Split) -> list[Record]:
        """The records of ``split`` over every domain, in ``encode`` order."""
        return [r for d in self.domains for r in load_domain_split(self.cfg, d, split)]

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self.encode("train")
            self.encode("val")
        if stage in (None, "test", "validate"):
            self.encode("val" if stage == "validate" else "test")

    def _collate(self) -> Any:
        return partial(collate_examples, pad_token_id=int(self.tokenizer.pad_token_id))

    def train_dataloader(self) -> DataLoader:
        ds = self.encode("train")
        sampler = LengthGroupedSampler(
            ds.lengths,
            int(self.cfg["batch_size"]),
            int(self.cfg["length_group_buckets"]),
            self.seed,
        )
        if self._resume:
            sampler.resume_at(self._resume["epoch"], self._resume["batches"])
        return DataLoader(
            ds,
            batch_size=int(self.cfg["batch_size"]),
            sampler=sampler,
            collate_fn=self._collate(),
            num_workers=int(self.cfg["num_workers"]),
            drop_last=False,
        )

    def eval_dataloader(self, split: Split) -> DataLoader:
        """Deterministic loader sorted by length (little padding); order does not matter for means."""
        ds = self.encode(split)
        order = sorted(range(len(ds)), key=lambda i: -ds.lengths[i])
        return DataLoader(
            EncodedDataset([ds[i] for i in order]),
            batch_size=int(self.cfg["eval_batch_size"]),
            shuffle=False,
            collate_fn=self._collate(),
            num_workers=int(self.cfg["num_workers"]),
        )

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader("test")
