"""Command line: ``python -m router route --model DIR`` (JSON lines in, one decision per line out).

Each input line is ``{"text": ...}``, ``{"prompt": ...}``, ``{"messages": [...]}`` or a JSON
string. An ``id`` field is echoed back. A line that is not JSON gets an ``invalid_input`` decision;
output order is input order. ``python -m router info --model DIR`` prints the router's config.

Standard output carries only that JSON, whatever the environment: file descriptor 1 is pointed at
standard error for the whole run (libraries print on import, e.g. transformers' "Running in WANDB
offline mode" under ``WANDB_MODE=offline``), and the results go to a saved copy of the original.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TextIO


def _parse(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        return _Unparsable(f"not valid JSON ({e.msg} at column {e.colno})")


class _Unparsable:
    """A stdin line that is not JSON; the router turns it into an ``invalid_input`` decision."""

    def __init__(self, detail: str) -> None:
        self.detail = detail


def _batches(lines: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for line in lines:
        if not line.strip():
            continue
        batch.append(line)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def route_lines(router: Any, lines: Iterable[str], out: TextIO, batch_size: int = 32) -> int:
    """Route JSON lines and write one decision JSON per line; returns the number routed."""
    from dataclasses import replace

    from router.decision import Reason

    n = 0
    for batch in _batches(lines, batch_size):
        parsed = [_parse(line) for line in batch]
        requests = [None if isinstance(p, _Unparsable) else p for p in parsed]
        decisions = router.route_batch(requests)
        for p, d in zip(parsed, decisions, strict=True):
            if isinstance(p, _Unparsable):
                d = replace(d, reason=Reason.INVALID_INPUT, detail=p.detail)
            row = d.to_dict()
            if isinstance(p, dict) and "id" in p:
                row = {"id": p["id"], **row}
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
        out.flush()
        n += len(batch)
    return n


@contextlib.contextmanager
def results_stdout() -> Iterator[TextIO]:
    """A UTF-8 stream on the real standard output, while fd 1 and ``sys.stdout`` go to stderr.

    Anything else that writes to standard output meanwhile (a ``print`` on import, a C library
    writing to fd 1) lands on stderr, so the stream stays machine-readable.
    """
    real = sys.stdout
    try:
        fd_backed = real.fileno() == 1
    except (AttributeError, OSError, ValueError):
        fd_backed = False
    if not fd_backed:  # sys.stdout was replaced (embedded use): guard Python writes only
        with contextlib.redirect_stdout(sys.stderr):
            yield real
        return
    real.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    out = os.fdopen(saved, "w", encoding="utf-8", newline="\n", closefd=False)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield out
    finally:
        with contextlib.suppress(BrokenPipeError):
            out.flush()
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m router", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_route = sub.add_parser("route", help="route JSON lines from stdin to decisions on stdout")
    p_route.add_argument("--model", required=True, help="a saved router folder")
    p_route.add_argument("--batch-size", type=int, default=32)
    p_info = sub.add_parser("info", help="print a saved router's configuration")
    p_info.add_argument("--model", required=True)
    args = parser.parse_args(argv)

    # keep model-loading progress bars and notices off stderr as well.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    with results_stdout() as out:
        from router.persistence import EncoderMismatchError, RouterFileError, read_router_config

        try:
            if args.command == "info":
                out.write(json.dumps(read_router_config(args.model), indent=2) + "\n")
                return 0
            from router.core import Router

            router = Router.load(args.model)
        except (RouterFileError, EncoderMismatchError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        try:
            route_lines(router, sys.stdin, out, args.batch_size)
        except BrokenPipeError:  # the reader went away (`| head`): not an error of ours
            return 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
