"""What text of a request gets routed, and which inputs never reach the encoder.

A request is a plain string, an OpenAI-style message list, or a mapping with ``messages``, ``text``
or ``prompt``. ``InputPolicy`` picks the text of a chat: the last user message, the last ``k``
turns, or the whole conversation. Bad input is returned as a ``BadInput`` (a reason and a detail),
never raised, so every request gets a decision.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from router.decision import Reason

MODES = ("last_user", "last_k", "conversation")


@dataclass(frozen=True)
class InputPolicy:
    """How a chat becomes one text.

    ``mode``: ``last_user`` | ``last_k`` (the last ``k`` messages) | ``conversation``.
    ``include_system``: also use system messages (often generic, so off by default).
    ``tail_chars``: joined turns keep only their last this-many characters, so the newest turns
    survive the encoder's token limit. ``english_only``: text mostly in non-Latin scripts is
    routed to ``base`` with reason ``unsupported_language`` (the default encoder is English-only).
    """

    mode: str = "last_user"
    k: int = 3
    include_system: bool = False
    tail_chars: int = 1000
    english_only: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"input policy mode must be one of {MODES}, got {self.mode!r}")
        if self.k < 1:
            raise ValueError(f"input policy k must be >= 1, got {self.k}")
        if self.tail_chars < 1:
            raise ValueError(f"input policy tail_chars must be >= 1, got {self.tail_chars}")


@dataclass(frozen=True)
class BadInput:
    reason: Reason
    detail: str


def _content_text(content: Any, where: str) -> str | BadInput:
    """Text of an OpenAI message ``content``: a string, a list of parts, or None (no text)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and not isinstance(content, bytes | bytearray):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, Mapping):
                return BadInput(Reason.INVALID_INPUT, f"{where}.content[{j}] is not an object")
            if part.get("type", "text") == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    return BadInput(
                        Reason.INVALID_INPUT, f"{where}.content[{j}].text is not a string"
                    )
                texts.append(text)
        return "\n".join(texts)
    return BadInput(Reason.INVALID_INPUT, f"{where}.content is {type(content).__name__}, not text")


def messages_text(messages: Sequence[Any], policy: InputPolicy) -> str | BadInput:
    """The text of a message list under ``policy``."""
    turns: list[tuple[str, str]] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            return BadInput(
                Reason.INVALID_INPUT, f"messages[{i}] is {type(msg).__name__}, not an object"
            )
        role = msg.get("role")
        if not isinstance(role, str):
            return BadInput(Reason.INVALID_INPUT, f"messages[{i}].role is missing or not a string")
        text = _content_text(msg.get("content"), f"messages[{i}]")
        if isinstance(text, BadInput):
            return text
        turns.append((role, text))
    if not any(role == "user" for role, _ in turns):
        return BadInput(Reason.NO_USER_TURN, f"no message with role 'user' among {len(turns)}")
    if policy.mode == "last_user":
        return next(text for role, text in reversed(turns) if role == "user")
    kept = [
        t
        for r, t in turns
        if r in ("user", "assistant") or (policy.include_system and r == "system")
    ]
    if policy.mode == "last_k":
        kept = kept[-policy.k :]
    return "\n\n".join(t for t in kept if t.strip())[-policy.tail_chars :]


def request_text(request: Any, policy: InputPolicy) -> str | BadInput:
    """The text to route for a string, a message list, or a mapping with messages / text / prompt."""
    if isinstance(request, str):
        return request
    if isinstance(request, Mapping):
        if "messages" in request:
            messages = request["messages"]
            if isinstance(messages, Sequence) and not isinstance(messages, str | bytes | bytearray):
                return messages_text(messages, policy)
            return BadInput(
                Reason.INVALID_INPUT, f"'messages' is {type(messages).__name__}, not a list"
            )
        for key in ("text", "prompt"):
            if key in request:
                value = request[key]
                if isinstance(value, str):
                    return value
                return BadInput(
                    Reason.INVALID_INPUT, f"'{key}' is {type(value).__name__}, not a string"
                )
        return BadInput(Reason.INVALID_INPUT, "object has none of 'messages', 'text', 'prompt'")
    if isinstance(request, Sequence) and not isinstance(request, bytes | bytearray):
        return messages_text(request, policy)
    return BadInput(Reason.INVALID_INPUT, f"{type(request).__name__} is not text or a chat request")


# Control characters (but tab / newlines / form feeds), replacement chars, surrogates, private use.
_GARBAGE = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x9f\ufffd\ud800-\udfff\ue000-\uf8ff]")
_LETTER = re.compile(r"[^\W\d_]")
_NON_LATIN_LETTER = re.compile(r"[^\W\d_\u0000-\u024f]")  # letters beyond Latin Extended-B


def check_text(text: str, policy: InputPolicy, sample_chars: int = 2000) -> BadInput | None:
    """Reject empty, binary-looking or (if ``english_only``) mostly non-Latin text; else None.

    Only the first ``sample_chars`` characters are inspected (regex scans), so the cost is small
    and bounded.
    """
    if not text.strip():
        return BadInput(Reason.EMPTY_INPUT, "empty or whitespace-only text")
    sample = text[:sample_chars]
    garbage = len(_GARBAGE.findall(sample))
    if garbage > 0.1 * len(sample):
        return BadInput(
            Reason.INVALID_INPUT, f"binary-looking text ({garbage}/{len(sample)} control chars)"
        )
    if policy.english_only:
        non_latin = len(_NON_LATIN_LETTER.findall(sample))  # few matches in English: fast
        if non_latin:
            letters = len(_LETTER.findall(sample))
            if non_latin > 0.5 * letters:
                return BadInput(
                    Reason.UNSUPPORTED_LANGUAGE, f"{non_latin}/{letters} letters are not Latin"
                )
    return None


def clean_text(text: str) -> str:
    """Text safe for any tokenizer: lone surrogates and NULs replaced."""
    return text.encode("utf-8", "replace").decode("utf-8").replace("\x00", " ")
