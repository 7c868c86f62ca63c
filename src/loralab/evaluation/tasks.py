"""Task accuracy beside NLL: multiple-choice sets scored by option likelihood and code checks' pass
rates, per system, with bootstrap intervals over questions and paired tests on the 0/1 outcomes.

The harness scores each set's option rows with the systems' scorers (``RoutedScorer`` /
``score_model``) and hands the rows' NLL here (``answered``), and the generation replies
(``generated``); this module turns them into metric entries (``eval/<set>/accuracy``,
``accuracy_norm``, ``pass_rate``) and the results' ``choice_sets`` / ``per_question`` /
``paired_tests_accuracy`` fields.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from transformers import PreTrainedTokenizerBase

from loralab.evaluation.benchmarks import choice_sets, router_heldout_groups
from loralab.evaluation.generation import generation_metrics
from loralab.evaluation.options import (
    ChoiceSet,
    accuracy_metrics,
    build_choice_set,
    paired_rate_tests,
    pick_options,
)
from loralab.evaluation.sets import EvalSet

Metric = dict[str, Any]


def load_choice_sets(
    cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, router_dir: str | Path | None
) -> dict[str, ChoiceSet]:
    """``eval.choice_sets`` and the multiple-choice ``eval.extra_sets``, encoded as option rows."""
    max_length = int(cfg.eval.choice_sets.max_length)
    found = choice_sets(cfg.data, cfg.eval, router_heldout_groups(router_dir))
    return {
        name: build_choice_set(name, questions, tokenizer, max_length, eos)
        for name, (questions, eos) in found.items()
    }


class TaskScores:
    """Accuracy and pass-rate outcomes of every system, and their metrics."""

    def __init__(self, sets: Mapping[str, ChoiceSet], bootstrap: Mapping[str, Any]) -> None:
        self.sets = dict(sets)
        self.boot = (int(bootstrap["n"]), int(bootstrap["seed"]), float(bootstrap["alpha"]))
        # {system: {set: per-question outcome}}: options picked, 0/1 right (multiple choice)
        self.per_question: dict[str, dict[str, dict[str, list]]] = {}
        # {system: {set: [0/1]}}: accuracy and pass-rate outcomes, for the paired tests
        self.rates: dict[str, dict[str, list[int]]] = {}

    @property
    def rows(self) -> dict[str, EvalSet]:
        """The option rows of every set, to score like NLL sets."""
        return {name: c.rows for name, c in self.sets.items()}

    def answered(self, system: str, per_set: Mapping[str, Mapping[str, Sequence]]) -> list[Metric]:
        """Option rows' ``nll_sum`` / ``n_tokens`` -> each question's pick; accuracy metrics."""
        out = []
        for set_name, scored in per_set.items():
            outcome = pick_options(self.sets[set_name], scored)
            self.per_question.setdefault(system, {})[set_name] = outcome
            self.rates.setdefault(system, {})[set_name] = outcome["correct"]
            out += accuracy_metrics(system, set_name, outcome, *self.boot)
        return out

    def generated(self, system: str, replies: Mapping[str, Sequence[Any]]) -> list[Metric]:
        """Generation metrics (pass rates with intervals); pass outcomes kept for paired tests."""
        for set_name, scored in replies.items():
            if scored and "passed" in scored[0]:
                self.rates.setdefault(system, {})[set_name] = [int(r["passed"]) for r in scored]
        return generation_metrics(system, replies, self.boot)

    def results(self, systems: Sequence[str], pairs: Sequence[Sequence[str]]) -> dict[str, Any]:
        """The results fields: ``choice_sets``, ``per_question``, ``paired_tests_accuracy``."""
        tests = {
            f"{a}_vs_{b}": paired_rate_tests(self.rates, a, b, *self.boot)
            for a, b in pairs
            if a in self.rates and b in self.rates
        }
        return {
            "choice_sets": {
                name: {
                    "n_questions": len(c.questions),
                    "n_options": len(c.rows.records),
                    "ids": [q.id for q in c.questions],
                    "groups": [q.group for q in c.questions],
                    "answers": [q.answer for q in c.questions],
                }
                for name, c in self.sets.items()
            },
            "per_question": {s: self.per_question[s] for s in systems if s in self.per_question},
            "paired_tests_accuracy": tests,
        }
