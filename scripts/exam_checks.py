"""The frozen exam-style checks through the router's command line, as issue 13 measures:

    python scripts/exam_checks.py requests exam3 > exam3.jsonl          # add --half dev|sealed
    python -m router route --model <run>/router < exam3.jsonl > exam3_decisions.jsonl
    python scripts/exam_checks.py score exam3 exam3_decisions.jsonl     # one JSON summary
    python scripts/exam_checks.py estimate exam2=d2.jsonl exam3=d3.jsonl   # --baseline exam2=... ...

``requests`` writes one ``{"id", "text"}`` line per question (no label); ``score`` reads the
decisions (any router's ``route`` output that echoes the ids, an older commit's included) and
prints accuracy overall and per half, recall per label and the mistakes (``gold -> decided``).
``estimate`` re-weights decisions on ``exam2`` to ``exam5`` into an estimate of the held-back
figure of issue 13 (``loralab.routing.held_back``); with ``--baseline``, another design's decisions
on the same checks, it adds that design's estimate and the paired lead over it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path

from loralab.routing.exam_check import (
    EXAM_CHECKS,
    HALVES,
    DecisionsFileError,
    ExamItem,
    exam_items,
    read_decisions,
    request_lines,
    score_decisions,
)
from loralab.routing.held_back import (
    MIN_STRATUM,
    NotEnoughChecks,
    Outcome,
    estimate_held_back,
    load_reference,
)


def _check_files(pairs: list[str], checks: Iterable[str]) -> dict[str, str]:
    files = {}
    for pair in pairs:
        check, sep, path = pair.partition("=")
        if not sep or check not in checks:
            raise DecisionsFileError(
                f"{pair!r}: expected CHECK=DECISIONS_FILE with CHECK one of "
                f"{sorted(checks)} (the checks the reference design answered)"
            )
        files[check] = path
    return files


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _correct(path: str, items: list[ExamItem]) -> list[bool]:
    with open(path, encoding="utf-8") as f:
        decided = read_decisions(items, f, path)
    return [decided[i.id]["label"] == i.label for i in items]


def _estimate(
    pairs: list[str], baseline_pairs: list[str] | None, half: str | None, min_stratum: int
) -> dict:
    reference = load_reference()
    files = _check_files(pairs, reference.decisions)
    base_files = _check_files(baseline_pairs or [], reference.decisions)
    if baseline_pairs and set(base_files) != set(files):
        raise DecisionsFileError(
            f"--baseline answers {sorted(base_files)}, the candidate {sorted(files)}: "
            "compare them on the same checks"
        )
    outcomes, baseline = [], []
    for check, path in files.items():
        items = exam_items(half, check)
        ref = reference.decisions[check]
        correct = _correct(path, items)
        outcomes += [Outcome(i.label, ref[i.id], c) for i, c in zip(items, correct, strict=True)]
        if baseline_pairs:
            baseline += _correct(base_files[check], items)
    return estimate_held_back(
        outcomes, reference.confusion, min_n=min_stratum, baseline=baseline or None
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, what in (("requests", "write the requests"), ("score", "score the decisions")):
        p = sub.add_parser(name, help=what)
        p.add_argument("check", choices=sorted(EXAM_CHECKS))
        p.add_argument("--half", choices=HALVES, default=None, help="one half (default: both)")
        if name == "score":
            p.add_argument("decisions", type=Path, help="python -m router route's output")
    est = sub.add_parser("estimate", help="estimate the held-back figure from decisions")
    est.add_argument("decisions", nargs="+", metavar="CHECK=FILE", help="e.g. exam3=d3.jsonl")
    est.add_argument(
        "--baseline", nargs="+", metavar="CHECK=FILE", help="another design, for the paired lead"
    )
    est.add_argument("--half", choices=HALVES, default=None, help="one half (default: both)")
    est.add_argument(
        "--min-stratum",
        type=_positive_int,
        default=MIN_STRATUM,
        help=f"check questions a stratum needs to stand for itself (default {MIN_STRATUM}; "
        "3 before exam13)",
    )
    args = parser.parse_args(argv)
    if args.command == "estimate":
        try:
            summary = _estimate(args.decisions, args.baseline, args.half, args.min_stratum)
        except (OSError, DecisionsFileError, NotEnoughChecks) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(json.dumps({"half": args.half, "min_stratum": args.min_stratum, **summary}))
        return 0
    items = exam_items(args.half, args.check)
    if args.command == "requests":
        sys.stdout.write("".join(line + "\n" for line in request_lines(items)))
        return 0
    try:
        with args.decisions.open(encoding="utf-8") as f:
            summary = score_decisions(items, f, str(args.decisions))
    except (OSError, DecisionsFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"check": args.check, "half": args.half, **summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
