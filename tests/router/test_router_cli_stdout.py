"""``python -m router route`` keeps standard output pure JSON lines whatever prints on import.

With ``WANDB_MODE=offline`` transformers prints ``[INFO] Running in WANDB offline mode`` to stdout
when sentence-transformers imports it; the real MiniLM encoder is what triggers that import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests_router_helpers import DESCRIPTIONS, LABELS, QUESTIONS, toy_texts

from router import InputPolicy, build_encoder
from router.fitting import FitConfig, fit_router

REPO = Path(__file__).resolve().parents[2]


def _run(args: list[str], stdin: str, env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    env.update(env_extra)
    return subprocess.run(
        [sys.executable, "-m", "router", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=True,
    )


@pytest.mark.slow
def test_route_stdout_is_only_json_with_wandb_offline(tmp_path: Path) -> None:
    import numpy as np

    encoder = build_encoder({"kind": "sentence_transformers", "name": "minilm"})
    texts, y = [], []
    for k, label in enumerate(LABELS):
        texts += toy_texts(label, 12, seed=0)
        y += [k] * 12
    x = encoder.encode(texts)
    router = fit_router(
        encoder,
        LABELS,
        x,
        np.asarray(y),
        x,
        np.asarray(y),
        descriptions=DESCRIPTIONS,
        policy=InputPolicy(),
        config=FitConfig(c=10.0, prototypes_per_label=4, max_risk=0.5),
    )
    router.save(tmp_path / "r")
    lines = [json.dumps({"id": i, "text": QUESTIONS[label]}) for i, label in enumerate(LABELS)]
    proc = _run(
        ["route", "--model", str(tmp_path / "r")],
        "\n".join(lines) + "\nnot json\n",
        {"WANDB_MODE": "offline", "TRANSFORMERS_VERBOSITY": "info"},
    )
    out_lines = proc.stdout.splitlines()
    assert len(out_lines) == len(lines) + 1
    rows = [json.loads(line) for line in out_lines]  # every stdout line is a JSON decision
    assert [r.get("id") for r in rows[:-1]] == list(range(len(lines)))
    assert rows[-1]["reason"] == "invalid_input"
    assert "WANDB offline mode" in proc.stderr  # the notice still reaches the user, on stderr

    info = _run(["info", "--model", str(tmp_path / "r")], "", {"WANDB_MODE": "offline"})
    assert json.loads(info.stdout)["labels"] == list(LABELS)
