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

import pytest

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


CACHE_BUILDER = """
import os, sys, time
from pathlib import Path
from loralab.io_utils import cached_directory

def build(tmp):
    with open(sys.argv[2], "a") as log:
        log.write(f"{os.getpid()}\\n")
    time.sleep(1.0)  # the other process arrives while this one builds
    (tmp / "model.safetensors").write_bytes(b"w" * 1000)

path = cached_directory(Path(sys.argv[1]), build)
assert (path / "model.safetensors").read_bytes() == b"w" * 1000
"""


def test_concurrent_runs_build_the_shared_cache_once(tmp_path):
    target, builds = tmp_path / "cache" / "model", tmp_path / "builds.txt"
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CACHE_BUILDER, str(target), str(builds)],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read() if proc.stderr else ""
    assert len(builds.read_text().split()) == 1  # built once, the other waited and reused it
    assert sorted(p.name for p in target.parent.iterdir()) == [".model.lock", "model"]


def _start(command: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        command, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_two_train_experts_runs_started_together_keep_to_their_own_outputs(tmp_path):
    cache = tmp_path / "cache"
    base = [
        sys.executable,
        str(REPO / "scripts" / "train_experts.py"),
        "experiment=smoke",
        "expert.domains=[law]",
        "expert.check=false",
        "logger=csv",
        f"paths.cache_dir={cache}",
    ]
    # default run dirs (outputs/train_experts/<time>-<pid> under cwd): same second, two folders
    procs = [_start([*base, f"seed={seed}"], tmp_path) for seed in (1, 2)]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    runs = sorted((tmp_path / "outputs" / "train_experts").iterdir())
    assert len(runs) == 2
    seeds = {}
    for run in runs:
        manifest = json.loads((run / "adapters/law/manifest.json").read_text())
        overrides = (run / ".hydra" / "overrides.yaml").read_text()
        seeds[run.name] = manifest["training"]["seed"]
        assert f"seed={seeds[run.name]}" in overrides  # its own config, its own adapter
        assert sorted(p.name for p in (run / "csv").iterdir()) == ["law"]
    assert sorted(seeds.values()) == [1, 2]

    # a run dir held by a running job (held here, so the overlap does not depend on timing):
    # a second job given it stops with a clear error and writes nothing; once free, it runs
    from loralab.io_utils import exclusive_run_dir

    shared = tmp_path / "shared"
    with exclusive_run_dir(shared):
        proc = _start([*base, f"hydra.run.dir={shared}"], tmp_path)
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 1
        assert f"{shared} is in use by another running job" in err
        assert not (shared / "adapters").exists()
    proc = _start([*base, f"hydra.run.dir={shared}"], tmp_path)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert (shared / "adapters/law/manifest.json").is_file()


@pytest.mark.slow
def test_two_processes_convert_the_real_gguf_once(tmp_path):
    """The real wheel: two processes load SmolLM2 with one empty cache; one converts, one waits."""
    code = (
        "import logging, sys; logging.basicConfig(level=logging.INFO)\n"
        "from omegaconf import OmegaConf\n"
        "from loralab.base_model import load_base_model\n"
        f"cfg = OmegaConf.load({str(REPO / 'conf/base_model/smollm2_135m.yaml')!r})\n"
        "load_base_model(cfg, sys.argv[1])\n"
    )
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)], env=env, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    logs = [proc.communicate(timeout=600)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], logs
    assert sum("converting" in log for log in logs) == 1
    assert (tmp_path / "smollm2-135m-instruct-q4_1" / "model.safetensors").is_file()
