"""``python -m router route``: JSON lines in, one decision per line out, in input order."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

from tests_router_helpers import QUESTIONS

from router import Router
from router.__main__ import route_lines

LINES = [
    json.dumps({"id": 1, "text": QUESTIONS["medical"]}),
    "this is not json",
    json.dumps({"messages": [{"role": "user", "content": QUESTIONS["code"]}]}),
    "",
    json.dumps(QUESTIONS["law"]),
    json.dumps({"id": "x", "text": "   "}),
    json.dumps({"messages": [{"role": "system", "content": "hi"}]}),
]
EXPECTED = [
    ("medical", "confident"),
    ("base", "invalid_input"),
    ("code", "confident"),
    ("law", "confident"),
    ("base", "empty_input"),
    ("base", "no_user_turn"),
]


def test_route_lines_in_order_with_small_batches(toy_router: Router) -> None:
    out = io.StringIO()
    n = route_lines(toy_router, LINES, out, batch_size=2)
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert n == 6
    assert [(r["label"], r["reason"]) for r in rows] == EXPECTED
    assert rows[0]["id"] == 1 and rows[4]["id"] == "x"
    assert "not valid JSON" in rows[1]["detail"]
    assert set(rows[0]) >= {"label", "probs", "reason", "margin", "model_version", "latency_ms"}


def test_command_line_end_to_end(toy_router: Router, tmp_path: Path) -> None:
    toy_router.save(tmp_path / "r")
    proc = subprocess.run(
        [sys.executable, "-m", "router", "route", "--model", str(tmp_path / "r")],
        input="\n".join(LINES) + "\n",
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["label"], r["reason"]) for r in rows] == EXPECTED


def test_command_line_reports_a_bad_router_folder(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "router", "route", "--model", str(tmp_path / "missing")],
        input="",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "router folder not found" in proc.stderr
