"""Per-request token choice (greedy, or temperature / top-p with the request's own seeded generator)
and incremental detokenisation with stop strings (text that may begin a stop string is held back).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks of the decoder (validated by the API layer)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    gate_weights: bool = False  # send the gate's weights for each generated token

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Sampler:
    """Chooses one row's tokens; sampling draws from a generator seeded by ``seed`` (or at random),
    so a seeded request gives the same tokens alone or inside any batch."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.generator: torch.Generator | None = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else secrets.randbits(63)
            self.generator = torch.Generator().manual_seed(seed)

    def sample(self, logits: torch.Tensor) -> int:
        """logits [V] (float32, CPU) -> a token id."""
        if self.generator is None:
            return int(logits.argmax())
        probs = torch.softmax(logits / self.params.temperature, dim=-1)  # [V]
        if self.params.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)  # [V]
            outside = sorted_probs.cumsum(0) - sorted_probs > self.params.top_p  # keeps >= 1 token
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self.generator))


class TextStream:
    """Generated token ids -> text deltas; stops at the first stop string (which is not emitted)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0  # characters of self.text already sent

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add one token; returns (new text to send, whether a stop string was reached)."""
        self.ids.append(token_id)
        text = str(self.tokenizer.decode(self.ids, skip_special_tokens=True))
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return "", False
        self.text = text
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if cuts:
            cut = max(min(cuts), self.emitted)
            self.text = text[:cut]
            return self._emit(cut), True
        hold = max((_overlap(text, s) for s in self.stop), default=0)
        return self._emit(len(text) - hold), False

    def flush(self) -> str:
        """What is left to send when generation ends without a stop string."""
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        delta = self.text[self.emitted : upto]
        self.emitted = upto
        return delta


def _overlap(text: str, stop: str) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of ``stop``."""
    for size in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:size]):
            return size
    return 0
