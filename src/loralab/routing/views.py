"""Generated training views: one record recast in the styles real traffic uses.

The domain files ask in few styles (MedQuAD "What are the symptoms of X?", contract templates,
"write a function"); exam-style traffic asks the same subjects as multiple-choice questions,
clinical vignettes and statements. Each function here turns one record into such a text, using
only the record itself and other records of the same label (for distractor options), so that the
style carries no label information and the subject has to:

- ``multiple_choice``: the record's question, then four lettered options: the first sentence of its
  own answer and of three other answers of the same label (in a position fixed by the record id).
- ``vignette`` (MedQuAD symptom records): "A 47-year-old woman presents with <three of the listed
  symptoms>. What is the most likely diagnosis?" with the disease and three others as options.
- ``response_sentence``: one plain-prose sentence of the answer (no code), a statement in the
  field's own vocabulary.

Everything is a pure function of the records (choices come from a SHA-256 of the record id), so
the views, and hence the embedding cache, are identical from run to run.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(])")
_CODE_LIKE = re.compile(r"[{};=<>`]|def |\(\)|\bimport\b|\breturn\b|#include")
_BULLET = re.compile(r"^\s*[-*\u2022]\s*(.+?)\s*[.;]?\s*$")
_SYMPTOMS_OF = re.compile(r"^What are the (?:signs and )?symptoms of (.+?)\s*\?$", re.I)
_LETTER_STYLES = ("{L}. {o}", "({L}) {o}", "{L}) {o}")


def stable_int(*parts: str) -> int:
    """A deterministic integer from strings (the same on every machine and run)."""
    return int.from_bytes(hashlib.sha256("\0".join(parts).encode()).digest()[:8], "little")


def first_sentence(text: str, max_chars: int = 120) -> str | None:
    """The answer's first statement as an option: its first line's first sentence, skipping a
    sentence that repeats a question (MedQuAD answers often start so); cut at ``max_chars`` on a
    word. None for an empty answer."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return None
    sentences = _SENTENCE_END.split(lines[0])
    while len(sentences) > 1 and sentences[0].endswith("?"):
        sentences = sentences[1:]
    sentence = sentences[0].rstrip(".")
    if len(sentence) > max_chars:
        sentence = sentence[:max_chars].rsplit(" ", 1)[0]
    return sentence or None


def prose_sentences(text: str, min_chars: int = 40, max_chars: int = 300) -> list[str]:
    """Statements of ``text`` that read as prose: no code characters, bullets, headings or
    questions."""
    out = []
    for para in re.split(r"\n\s*\n|\n(?=\s*[-*\u2022])", text):
        if _CODE_LIKE.search(para) or para.lstrip().startswith(("-", "*", "#", "//")):
            continue
        for s in _SENTENCE_END.split(" ".join(para.split())):
            if min_chars <= len(s) <= max_chars and s[-1] == "." and " - " not in s:
                out.append(s)
    return out


def format_options(question: str, options: Sequence[str], key: str) -> str:
    """``question`` then one lettered option per line, in a letter style chosen by ``key``."""
    style = _LETTER_STYLES[stable_int(key, "style") % len(_LETTER_STYLES)]
    lines = [style.format(L="ABCDEFGH"[i], o=o) for i, o in enumerate(options)]
    return "\n".join([question.strip(), *lines])


def pick_distractors(key: str, pool: Sequence[str], own: str, k: int = 3) -> list[str]:
    """``k`` distinct entries of ``pool`` other than ``own``, chosen by ``key`` (few tries)."""
    out: list[str] = []
    if len(pool) <= k:
        return out
    for attempt in range(8 * k):
        cand = pool[stable_int(key, "distractor", str(attempt)) % len(pool)]
        if cand != own and cand not in out:
            out.append(cand)
            if len(out) == k:
                break
    return out


def multiple_choice(key: str, question: str, answer: str, pool: Sequence[str]) -> str | None:
    """A four-option question: the record's ``answer`` among three ``pool`` distractors."""
    distractors = pick_distractors(key, pool, answer)
    if len(distractors) < 3:
        return None
    options = list(distractors)
    options.insert(stable_int(key, "position") % 4, answer)
    return format_options(question, options, key)


def symptoms_disease(instruction: str, response: str) -> tuple[str, list[str]] | None:
    """``(disease, symptoms)`` of a MedQuAD "What are the symptoms of X?" record, if listed."""
    m = _SYMPTOMS_OF.match(instruction.strip())
    if not m:
        return None
    symptoms = []
    for item in re.split(r"\n|\s-\s", response)[1:]:  # MedQuAD lists: "... include: - a. - b."
        b = _BULLET.match(item) or _BULLET.match(f"- {item}")
        text = b.group(1).rstrip(".") if b else ""
        if 3 <= len(text) <= 60 and not re.search(r"[():%]|\d", text):
            symptoms.append(text[0].lower() + text[1:])
    return (m.group(1), symptoms) if len(symptoms) >= 3 else None


def vignette(
    key: str, disease: str, symptoms: Sequence[str], diseases: Sequence[str]
) -> str | None:
    """A short clinical vignette of three of ``symptoms``, asking for the diagnosis."""
    h = stable_int(key, "vignette")
    age = 18 + h % 70
    who = ("man", "woman", "patient")[(h >> 8) % 3]
    start = (h >> 16) % max(1, len(symptoms) - 2)
    picked = list(symptoms[start : start + 3])
    findings = ", ".join(picked[:-1]) + f" and {picked[-1]}"
    question = (
        f"A {age}-year-old {who} presents with {findings}. What is the most likely diagnosis?"
    )
    return multiple_choice(key, question, disease, diseases)
