"""Gate training end to end on the tiny model: smoke run, resume, real smoke experts, freezing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loralab.base_model import load_base_model
from loralab.training.moelora_gate import GateTrainingModule, train_moelora
from moelora import MoELoraConfig, MoELoraModel, load_moelora


def test_smoke_run_trains_only_the_gate_saves_it_and_resumes(compose_cfg: Callable) -> None:
    cfg = compose_cfg(config_name="train_moelora", overrides=["logger=csv"])
    result = train_moelora(cfg)
    assert result["random_experts"] is True and result["global_step"] == 4
    gate_dir = Path(result["gate_dir"])
    saved = load_file(str(gate_dir / "gate.safetensors"))
    assert sum(t.numel() for t in saved.values()) == result["trainable_parameters"]
    assert (gate_dir / "usage.png").is_file()
    usage = result["usage"]
    assert usage["slots"] == ["law", "code", "medical", "none"]
    assert torch.allclose(torch.tensor(usage["mean"]).sum(-1), torch.ones(3), atol=1e-4)
    assert {"val/loss", "train/aux_load_balance", "val/usage/law/code"} <= set(result["metrics"])

    checkpoint = torch.load(
        Path(cfg.paths.output_dir) / "checkpoints/moelora/last.ckpt", weights_only=True
    )
    assert checkpoint["state_dict"] and all(".gate." in k for k in checkpoint["state_dict"])

    base, _ = load_base_model(cfg.base_model, device="cpu")
    model = load_moelora(base, gate_dir)
    for key, value in model.gate_state_dict().items():
        assert torch.equal(value, saved[key])

    cfg.trainer.max_steps = 6  # same run dir, ckpt_path=last: continues from step 4
    assert train_moelora(cfg)["global_step"] == 6


def test_trains_over_the_smoke_experts_run(compose_cfg: Callable, smoke_experts: dict) -> None:
    adapters = Path(smoke_experts["dir"]) / "adapters"
    cfg = compose_cfg(
        config_name="train_moelora",
        overrides=[f"experts_dir={adapters}", "logger=none", "ckpt_path=null"],
    )
    result = train_moelora(cfg)
    assert result["random_experts"] is False
    assert result["base_fingerprint"] == smoke_experts["base_fingerprint"]
    assert result["experts"] == {d: str(adapters / d) for d in ("law", "code", "medical")}


def test_module_refuses_trainable_weights_outside_the_gate(
    expert_dirs: dict[str, Path], base_factory: Callable[[], torch.nn.Module]
) -> None:
    model = MoELoraModel.from_adapters(base_factory(), expert_dirs, MoELoraConfig())
    GateTrainingModule(model, {"lr": 1e-3}, ["law", "code", "medical"])
    model.base_model.lm_head.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="only gate parameters may train"):
        GateTrainingModule(model, {"lr": 1e-3}, ["law", "code", "medical"])
