"""The frozen exam-style checks through the router's command line, as issue 13 measures:

    python scripts/exam_checks.py requests exam3 > exam3.jsonl          # add --half dev|sealed
    python -m router route --model <run>/router < exam3.jsonl > exam3_decisions.jsonl
    python scripts/exam_checks.py score exam3 exam3_decisions.jsonl     # one JSON summary

``requests`` writes one ``{"id", "text"}`` line per question (no label); ``score`` reads the
decisions (any router's ``route`` output that echoes the ids, an older commit's included) and
prints accuracy overall and per half, recall per label and the mistakes (``gold -> decided``).
``exam5`` is held back (README): read it only to confirm a design chosen on the other checks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from loralab.routing.exam_check import (
    EXAM_CHECKS,
    HALVES,
    DecisionsFileError,
    exam_items,
    request_lines,
    score_decisions,
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
    args = parser.parse_args(argv)
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
