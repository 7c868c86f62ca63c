"""scripts/bench_serve.py as a user runs it: the smoke run is trained first when missing, a server
is started, the loads run, the last line is the JSON summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def bench(tmp: Path, *overrides: str) -> dict:
    command = [
        sys.executable,
        "scripts/bench_serve.py",
        "experiment=smoke",
        f"run_dir={tmp / 'run'}",
        "server.num_threads=1",
        f"hydra.run.dir={tmp / 'hydra'}",
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench_serve")


def test_bench_serve_smoke_trains_the_run_and_prints_the_summary(smoke_dir):
    result = bench(
        smoke_dir, "bench.requests=48", "bench.concurrency=8", "bench.sequential_requests=4"
    )
    assert (smoke_dir / "run" / "moelora" / "moelora" / "moelora.json").is_file()  # trained first
    assert result["requests"] == 48 and result["errors"] == 0 and result["concurrency"] == 8
    assert result["tokens"] == 48 * 16  # ignore_eos: every answer is max_tokens long
    assert result["single"]["errors"] == 0 and result["single"]["tokens"] == 48 * 16
    for key in (
        "tokens_per_s",
        "p50_ms",
        "p99_ms",
        "ttft_p50_ms",
        "mixed_vs_single_ratio",
        "batched_vs_sequential_ratio",
    ):
        assert result[key] > 0, key
    assert result["p99_ms"] >= result["p50_ms"]
    assert set(result["models"]) == {"base", "law", "code", "medical", "auto", "moe"}


def test_engine_comparison_decodes_what_generate_decodes_alone(smoke_dir):
    result = bench(
        smoke_dir, "bench.engines=true", "bench.engine_concurrency=[3]", "bench.engine_check=3"
    )
    row = result["3"]
    assert row["checked"] == 3
    for name in ("transformers_cb", "loralab_base", "loralab_mixed"):
        assert row[f"{name}_equal_alone"] == 3, name
        assert row[f"{name}_tokens_per_s"] > 0
