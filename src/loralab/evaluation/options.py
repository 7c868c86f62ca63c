"""Multiple-choice accuracy by option likelihood, batched through the same scorers as NLL.

Each (question, option) pair is one row: the question in the chat template, then the option as the
assistant's reply; only the option's tokens are scored (``batch_nll``: summed NLL and token count).
The rows of a question share its record id, so a request-level system makes one choice per
question (the router decides on the question text) and every option is scored under it; the rows
form an ``EvalSet`` (``shared_prompts``) that ``RoutedScorer`` / ``score_model`` score like any
other set (mixed batches, each single choice once), the question's prompt forwarded once and its
KV cache shared by the options (``prefix.py``). The pick is the option of lowest summed NLL
(``accuracy``, as lm-evaluation-harness's ``acc``) or of lowest NLL per option token
(``accuracy_norm``).

Accuracy intervals bootstrap questions; paired tests compare two systems' 0/1 outcomes on the same
questions (``stats.paired_bootstrap`` with unit weights: the difference of accuracies, a - b).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from loralab.data.formatting import IGNORE_INDEX, EncodedExample, prompt_text
from loralab.data.records import Record
from loralab.evaluation.benchmarks import ChoiceQuestion
from loralab.evaluation.sets import EvalSet
from loralab.evaluation.stats import bootstrap_mean_ci, paired_bootstrap

_KEEP_PROMPT_HEAD = 32  # tokens of the chat template's start kept when a long prompt is cut

Outcome = dict[str, list]  # {"correct": [0/1], "correct_norm": [0/1], "pred": [int], ...}


@dataclass(frozen=True)
class ChoiceSet:
    """A multiple-choice set and its option rows (``rows``: one ``EvalSet`` row per option)."""

    name: str
    questions: list[ChoiceQuestion]
    rows: EvalSet
    question_of: list[int]  # row -> question index
    option_of: list[int]  # row -> option index


def encode_option(
    tokenizer: PreTrainedTokenizerBase, prompt: str, option: str, max_length: int, eos: bool
) -> EncodedExample:
    """``prompt`` (chat template) + ``option`` (+ eos), only the option's tokens scored. A prompt
    too long loses its middle: the template's start and the end (question, assistant header) stay."""
    ids = tokenizer(prompt_text(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    answer = tokenizer(
        option + (str(tokenizer.eos_token) if eos else ""), add_special_tokens=False
    )["input_ids"]
    budget = max_length - len(answer)
    if budget < 2 * _KEEP_PROMPT_HEAD:
        raise ValueError(
            f"option {option!r:.40} leaves no room for the prompt in {max_length} tokens"
        )
    if len(ids) > budget:
        ids = ids[:_KEEP_PROMPT_HEAD] + ids[len(ids) - (budget - _KEEP_PROMPT_HEAD) :]
    return EncodedExample(list(ids) + list(answer), [IGNORE_INDEX] * len(ids) + list(answer))


def build_choice_set(
    name: str,
    questions: Sequence[ChoiceQuestion],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    eos: bool = False,
) -> ChoiceSet:
    """The option rows of ``questions``; record ids are ``<set>/<question id>`` (one routing
    decision per question, no clash with other sets' ids)."""
    records: list[Record] = []
    examples: list[EncodedExample] = []
    question_of: list[int] = []
    option_of: list[int] = []
    for qi, q in enumerate(questions):
        for oi, option in enumerate(q.choices):
            records.append(Record(f"{name}/{q.id}", q.domain, q.prompt, option))
            examples.append(encode_option(tokenizer, q.prompt, option, max_length, eos))
            question_of.append(qi)
            option_of.append(oi)
    rows = EvalSet(name, records, examples, shared_prompts=True)
    return ChoiceSet(name, list(questions), rows, question_of, option_of)


def pick_options(choice_set: ChoiceSet, scored: Mapping[str, Sequence[float]]) -> Outcome:
    """Each question's picked option (lowest summed NLL; lowest NLL per token) and correctness,
    from the rows' ``nll_sum`` / ``n_tokens``."""
    n = len(choice_set.questions)
    sums = np.asarray(scored["nll_sum"], dtype=np.float64)
    counts = np.maximum(np.asarray(scored["n_tokens"], dtype=np.float64), 1.0)
    best = np.full(n, np.inf)
    best_norm = np.full(n, np.inf)
    pred = [0] * n
    pred_norm = [0] * n
    for row, (qi, oi) in enumerate(zip(choice_set.question_of, choice_set.option_of, strict=True)):
        if sums[row] < best[qi]:
            best[qi], pred[qi] = sums[row], oi
        if sums[row] / counts[row] < best_norm[qi]:
            best_norm[qi], pred_norm[qi] = sums[row] / counts[row], oi
    answers = [q.answer for q in choice_set.questions]
    return {
        "pred": pred,
        "pred_norm": pred_norm,
        "correct": [int(p == a) for p, a in zip(pred, answers, strict=True)],
        "correct_norm": [int(p == a) for p, a in zip(pred_norm, answers, strict=True)],
    }


def rate_metrics(
    system: str,
    set_name: str,
    outcomes: Mapping[str, Sequence[int]],
    n_boot: int,
    seed: int,
    alpha: float,
) -> list[dict[str, Any]]:
    """``accuracy`` / ``accuracy_norm`` (or any 0/1 outcome named in ``outcomes``: metric name ->
    per-question 0/1) with the bootstrap interval over questions."""
    out = []
    for metric, values in outcomes.items():
        ones = np.ones(len(values))
        mean, low, high = bootstrap_mean_ci(
            np.asarray(values, dtype=np.float64), ones, n_boot=n_boot, seed=seed, alpha=alpha
        )
        out.append(
            {
                "system": system,
                "set": set_name,
                "metric": metric,
                "value": mean,
                "ci_low": low,
                "ci_high": high,
            }
        )
    return out


def accuracy_metrics(
    system: str, set_name: str, outcome: Outcome, n_boot: int, seed: int, alpha: float
) -> list[dict[str, Any]]:
    """``accuracy`` (summed option NLL) and ``accuracy_norm`` (per option token) of one set."""
    rates = {"accuracy": outcome["correct"], "accuracy_norm": outcome["correct_norm"]}
    return rate_metrics(system, set_name, rates, n_boot, seed, alpha)


def paired_rate_tests(
    outcomes: Mapping[str, Mapping[str, Sequence[int]]],
    a: str,
    b: str,
    n_boot: int,
    seed: int,
    alpha: float,
) -> dict[str, dict[str, float]]:
    """Per set both systems have: accuracy (or pass rate) of a - b on the same questions, its
    bootstrap interval and paired permutation p-value; diff > 0 means a is right more often."""
    out = {}
    for set_name, right_a in outcomes.get(a, {}).items():
        right_b = outcomes.get(b, {}).get(set_name)
        if right_b is None:
            continue
        if len(right_a) != len(right_b):
            raise ValueError(f"{set_name}: {a} has {len(right_a)} outcomes, {b} {len(right_b)}")
        ones = np.ones(len(right_a))
        out[set_name] = paired_bootstrap(
            np.asarray(right_a, dtype=np.float64),
            np.asarray(right_b, dtype=np.float64),
            ones,
            n_boot=n_boot,
            seed=seed,
            alpha=alpha,
        )
    return out
