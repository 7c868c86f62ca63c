"""The running rows' KV cache: one left-padded ``DynamicCache`` whose rows join and leave between steps.

Rows have different lengths; each row's real tokens sit at the right end, pads (masked out, zero
keys and values) at the left. Newcomers are prefilled on their own (left-padded among themselves)
and then appended: the shorter of the two caches is padded on the left to the longer one's
length. Rows that finish are dropped with an index select, and columns that became pads in every
remaining row are cut, so the cache never holds more than the longest running row needs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class BatchKV:
    """A DynamicCache over B rows plus the attention mask [B, T] that tells pads from tokens."""

    def __init__(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        self.layers: list[DynamicLayer] = []
        for layer in cache.layers:
            if type(layer) is not DynamicLayer:  # sliding / static layers cannot be padded here
                raise TypeError(
                    f"only full-attention DynamicLayer caches, got {type(layer).__name__}"
                )
            self.layers.append(layer)
        self.cache = cache
        self.mask = mask  # [B, T] long, 1 = token

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])

    def lengths(self) -> torch.Tensor:
        """Real tokens per row [B] (the next token's position)."""
        return self.mask.sum(dim=1)

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention_mask [B, T+1], position_ids [B, 1]) for one decoding step."""
        positions = self.lengths()[:, None]  # [B, 1]
        mask = torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], dim=1)  # [B, T+1]
        return mask, positions

    def advance(self, mask: torch.Tensor) -> None:
        """Record the step's mask (the cache grew by one column inside the forward)."""
        self.mask = mask

    def append(self, other: BatchKV) -> None:
        """Add ``other``'s rows after this cache's rows (left-padding the shorter one)."""
        length = max(self.length, other.length)
        mine, theirs = length - self.length, length - other.length
        for layer, new in zip(self.layers, other.layers, strict=True):
            (k, v), (k_new, v_new) = _tensors(layer), _tensors(new)  # [B, H, T, D] each
            layer.keys = torch.cat([_pad_left(k, mine), _pad_left(k_new, theirs)])
            layer.values = torch.cat([_pad_left(v, mine), _pad_left(v_new, theirs)])
        self.mask = torch.cat(
            [_pad_left(self.mask, mine, dim=1), _pad_left(other.mask, theirs, dim=1)]
        )

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (in that order), then cut columns that are pads in every row."""
        index = torch.as_tensor(list(rows), dtype=torch.long, device=self.mask.device)
        self.mask = self.mask.index_select(0, index)
        for layer in self.layers:
            keys, values = _tensors(layer)
            layer.keys, layer.values = keys.index_select(0, index), values.index_select(0, index)
        if self.rows == 0:
            return
        lead = int(
            (self.mask.cumsum(dim=1) == 0).sum(dim=1).min()
        )  # pads before every row's first token
        if lead:
            self.mask = self.mask[:, lead:]
            for layer in self.layers:
                keys, values = _tensors(layer)
                layer.keys, layer.values = keys[:, :, lead:], values[:, :, lead:]


def _tensors(layer: DynamicLayer) -> tuple[torch.Tensor, torch.Tensor]:
    keys, values = layer.keys, layer.values
    assert isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor)
    return keys, values


def _pad_left(tensor: torch.Tensor, count: int, dim: int = 2) -> torch.Tensor:
    """``count`` zeros before ``tensor`` along ``dim`` (the sequence axis: 2 for [B, H, T, D])."""
    if count == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = count
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [n, L], attention_mask [n, L]) for prompts of different lengths, pads on the left."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, length - len(row) :] = torch.as_tensor(list(row), dtype=torch.long)
            mask[i, length - len(row) :] = 1
    return ids, mask
