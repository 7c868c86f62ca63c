"""Interrupted and concurrent training runs, as subprocesses on the tiny model: `kill -9` in the
middle of expert training then the same command resumes to the same adapter; retrain starts over;
two runs started together with one cache directory both succeed and keep to their own folders."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from loralab.io_utils import file_sha256

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}


def _train_command(run_dir: Path, cache: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(REPO / "scripts" / "train_experts.py"),
        "experiment=smoke",
        "expert.domains=[law]",
        "expert.check=false",
        "logger=none",
        "trainer.max_steps=40",
        "trainer.val_check_interval=16",
        "checkpoint_every_n_steps=6",  # mid-epoch: an epoch is 4 batches
        f"hydra.run.dir={run_dir}",
        f"paths.cache_dir={cache}",
        *extra,
    ]


def _run(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_kill_9_mid_training_then_the_same_command_resumes_to_the_same_adapter(tmp_path):
    reference = tmp_path / "reference"
    _run(_train_command(reference, tmp_path / "cache"))

    run = tmp_path / "interrupted"
    command = _train_command(run, tmp_path / "cache")
    proc = subprocess.Popen(
        command, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    last = run / "checkpoints" / "law" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # kill -9 right after its first checkpoint
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (run / "adapters" / "law").exists()

    resumed = _run(command)
    assert "expert law: resuming from" in resumed.stdout
    adapter = "adapters/law/adapter_model.safetensors"
    assert file_sha256(run / adapter) == file_sha256(reference / adapter)  # bit-identical on CPU
    manifest = json.loads((run / "adapters/law/manifest.json").read_text())
    assert manifest["training"]["global_step"] == 40

    # retrain: a finished last.ckpt is not resumed; training starts again from step 0
    again = _run([*command, "expert.retrain=true"])
    assert "expert law: retrain: deleting the checkpoints" in again.stdout
    assert "resuming from" not in again.stdout
    assert file_sha256(run / adapter) == file_sha256(reference / adapter)
