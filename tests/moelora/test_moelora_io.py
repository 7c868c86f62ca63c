"""Gate save / load: round trip, and refusal when experts, config or files changed."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from moelora import (
    GateConfig,
    GateFileError,
    MoELoraConfig,
    MoELoraModel,
    load_gate,
    load_moelora,
    save_gate,
)

CONFIG = MoELoraConfig(gate=GateConfig(kind="mlp", hidden_size=8, top_k=2, init_std=0.3))


@pytest.fixture
def saved(
    expert_dirs: dict[str, Path], base_factory: Callable[[], torch.nn.Module], tmp_path: Path
) -> tuple[MoELoraModel, Path]:
    model = MoELoraModel.from_adapters(base_factory(), expert_dirs, CONFIG).eval()
    return model, save_gate(model, tmp_path / "gate")


def test_round_trip_restores_gate_and_logits(
    saved: tuple[MoELoraModel, Path],
    base_factory: Callable[[], torch.nn.Module],
    tokens: torch.Tensor,
) -> None:
    model, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == ["gate.safetensors", "moelora.json"]
    meta = json.loads((folder / "moelora.json").read_text())
    assert [e["name"] for e in meta["experts"]] == ["law", "code", "medical"]
    restored = load_moelora(base_factory(), folder).eval()
    for key, value in model.gate_state_dict().items():
        assert torch.equal(restored.gate_state_dict()[key], value)
    with torch.no_grad():
        torch.testing.assert_close(
            restored(input_ids=tokens).logits, model(input_ids=tokens).logits, atol=0, rtol=0
        )
    save_gate(restored, folder)  # overwriting an existing gate folder works
    assert not list(folder.parent.glob(".gate*"))


def test_gate_over_a_retrained_expert_is_refused(
    saved: tuple[MoELoraModel, Path],
    expert_dirs: dict[str, Path],
    base_factory: Callable[[], torch.nn.Module],
    expert_writer: Callable[..., Path],
    tmp_path: Path,
) -> None:
    _, folder = saved
    experts = {n: Path(shutil.copytree(d, tmp_path / "copy" / n)) for n, d in expert_dirs.items()}
    shutil.rmtree(experts["code"])
    expert_writer(experts["code"], base_factory(), "code", 2, 4, seed=77)  # new file + manifest
    model = MoELoraModel.from_adapters(base_factory(), experts, CONFIG)
    with pytest.raises(GateFileError, match=r"adapter file changed or the experts differ"):
        load_gate(model, folder)


def test_gate_for_other_config_or_tampered_file_is_refused(
    saved: tuple[MoELoraModel, Path],
    expert_dirs: dict[str, Path],
    base_factory: Callable[[], torch.nn.Module],
) -> None:
    _, folder = saved
    dense = MoELoraModel.from_adapters(base_factory(), expert_dirs, MoELoraConfig())
    with pytest.raises(GateFileError, match=r"field 'config.gate'"):
        load_gate(dense, folder)
    reordered = {n: expert_dirs[n] for n in ("code", "law", "medical")}
    with pytest.raises(GateFileError, match=r"experts differ"):
        load_gate(MoELoraModel.from_adapters(base_factory(), reordered, CONFIG), folder)
    with (folder / "gate.safetensors").open("ab") as handle:
        handle.write(b" ")
    with pytest.raises(GateFileError, match=r"sha256 differs"):
        load_moelora(base_factory(), folder)


def test_load_can_switch_compute_path(
    saved: tuple[MoELoraModel, Path],
    base_factory: Callable[[], torch.nn.Module],
    tokens: torch.Tensor,
) -> None:
    model, folder = saved
    topk = load_moelora(base_factory(), folder, compute_path="topk").eval()
    assert {layer.compute_path for _, layer in topk.moe_layers()} == {"topk"}
    with torch.no_grad():
        torch.testing.assert_close(
            topk(input_ids=tokens).logits, model(input_ids=tokens).logits, atol=1e-5, rtol=0
        )


def test_routing_options_may_differ_from_training(
    saved: tuple[MoELoraModel, Path],
    expert_dirs: dict[str, Path],
    base_factory: Callable[[], torch.nn.Module],
) -> None:
    model, folder = saved
    sharper = MoELoraConfig(gate=replace(CONFIG.gate, top_k=1, temperature=0.5))
    other = MoELoraModel.from_adapters(base_factory(), expert_dirs, sharper)
    load_gate(other, folder)
    for key, value in model.gate_state_dict().items():
        assert torch.equal(other.gate_state_dict()[key], value)


def test_missing_or_malformed_metadata(
    tmp_path: Path, base_factory: Callable[[], torch.nn.Module]
) -> None:
    with pytest.raises(GateFileError, match=r"moelora.json: file not found"):
        load_moelora(base_factory(), tmp_path)
    (tmp_path / "moelora.json").write_text('{"format": "moelora-gate/1", "config": {}}')
    with pytest.raises(GateFileError, match=r"field 'experts' missing"):
        load_moelora(base_factory(), tmp_path)
