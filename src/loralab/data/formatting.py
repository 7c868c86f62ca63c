"""Chat-template formatting and tokenization with the loss on response tokens only."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
_KEEP_PROMPT_TAIL = 8  # tokens of the assistant header kept when a long prompt is cut


@dataclass(frozen=True)
class EncodedExample:
    """One tokenized pair. ``labels`` is ``IGNORE_INDEX`` on prompt tokens, the token id elsewhere."""

    input_ids: list[int]
    labels: list[int]
    domain_id: int = -1
    prior: tuple[float, ...] | None = None  # the request router's gate-slot probabilities

    def __len__(self) -> int:
        return len(self.input_ids)


def prompt_text(tokenizer: PreTrainedTokenizerBase, instruction: str) -> str:
    """The user turn rendered with the tokenizer's chat template, ending with the assistant header."""
    messages = [{"role": "user", "content": instruction}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert isinstance(text, str)
    return text


def encode_pair(
    tokenizer: PreTrainedTokenizerBase,
    instruction: str,
    response: str,
    max_length: int,
    domain_id: int = -1,
) -> EncodedExample:
    """Tokenize ``prompt + response + eos``; mask the prompt; fit into ``max_length`` tokens.

    When too long, the response keeps at least half of ``max_length`` (or all of it, if shorter)
    and the prompt is cut in its middle, keeping its head and the assistant header.
    """
    if max_length < 2 * _KEEP_PROMPT_TAIL:
        raise ValueError(
            f"data.max_length={max_length} is too small (minimum {2 * _KEEP_PROMPT_TAIL})"
        )
    prompt = tokenizer(prompt_text(tokenizer, instruction), add_special_tokens=False)["input_ids"]
    answer = tokenizer(response + str(tokenizer.eos_token), add_special_tokens=False)["input_ids"]
    if len(prompt) + len(answer) > max_length:
        answer_budget = min(len(answer), max(max_length - len(prompt), max_length // 2))
        answer = answer[:answer_budget]
        prompt_budget = max_length - len(answer)
        if len(prompt) > prompt_budget:
            head = prompt_budget - _KEEP_PROMPT_TAIL
            prompt = prompt[:head] + prompt[-_KEEP_PROMPT_TAIL:]
    return EncodedExample(
        input_ids=list(prompt) + list(answer),
        labels=[IGNORE_INDEX] * len(prompt) + list(answer),
        domain_id=domain_id,
    )
