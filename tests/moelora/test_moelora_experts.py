"""Building from adapter folders: the checks on manifests, hashes, base model and target modules."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from moelora import ExpertError, MoELoraModel, read_expert


def copy_experts(expert_dirs: dict[str, Path], root: Path) -> dict[str, Path]:
    return {name: Path(shutil.copytree(src, root / name)) for name, src in expert_dirs.items()}


def edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_reads_manifest_and_weights(expert_dirs: dict[str, Path]) -> None:
    expert = read_expert("law", expert_dirs["law"])
    assert expert.info.domain == "law" and expert.info.base_fingerprint == "tiny-llama-fingerprint"
    a, b = expert.weights["model.layers.0.mlp.down_proj"]
    assert a.shape == (4, 48) and b.shape == (32, 4)
    assert expert.scaling("model.layers.0.mlp.down_proj") == 2.0


def test_changed_adapter_file_is_refused(expert_dirs: dict[str, Path], tmp_path: Path) -> None:
    dirs = copy_experts(expert_dirs, tmp_path)
    with (dirs["code"] / "adapter_model.safetensors").open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ExpertError, match=r"sha256 .* differs from adapter_sha256"):
        read_expert("code", dirs["code"])


def test_experts_on_different_base_models_are_refused(
    expert_dirs: dict[str, Path],
    tmp_path: Path,
    base_factory: Callable[[], torch.nn.Module],
) -> None:
    dirs = copy_experts(expert_dirs, tmp_path)
    edit_json(dirs["medical"] / "manifest.json", base_model={"name": "other", "fingerprint": "f2"})
    with pytest.raises(ExpertError, match=r"'medical' was trained on base fingerprint f2"):
        MoELoraModel.from_adapters(base_factory(), dirs)
    with pytest.raises(ExpertError, match=r"the expected base model"):
        MoELoraModel.from_adapters(
            base_factory(), expert_dirs, expected_base_fingerprint="something-else"
        )


def test_different_target_modules_are_refused(
    expert_dirs: dict[str, Path],
    tmp_path: Path,
    base_factory: Callable[[], torch.nn.Module],
    expert_writer: Callable[..., Path],
) -> None:
    attention_only = expert_writer(
        tmp_path / "attn", base_factory(), "law", 4, 8, 9, target_modules=["q_proj", "v_proj"]
    )
    experts = {"law": attention_only, "code": expert_dirs["code"]}
    with pytest.raises(ExpertError, match=r"'code' targets different modules than 'law'"):
        MoELoraModel.from_adapters(base_factory(), experts)


def test_experts_for_a_different_architecture_are_refused(
    expert_dirs: dict[str, Path],
) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=96,
            hidden_size=64,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(ExpertError, match=r"base layer maps 64->"):
        MoELoraModel.from_adapters(wider, expert_dirs)
    # refused before anything was touched
    assert all(type(m).__name__ != "MoELoraLinear" for m in wider.modules())
    assert all(p.requires_grad for p in wider.parameters())


@pytest.mark.parametrize(
    ("file", "change", "message"),
    [
        ("adapter_config.json", {"use_dora": True}, "field 'use_dora'=True is not supported"),
        ("adapter_config.json", {"peft_type": "IA3"}, "field 'peft_type' must be 'LORA'"),
        ("adapter_config.json", {"r": 5}, "disagree with"),
        ("manifest.json", {"adapter_sha256": 7}, "field 'adapter_sha256' must be str"),
        ("manifest.json", {"lora": {"r": 2}}, "missing field 'lora.lora_alpha'"),
    ],
)
def test_malformed_folders_give_a_clear_error(
    expert_dirs: dict[str, Path], tmp_path: Path, file: str, change: dict[str, object], message: str
) -> None:
    dirs = copy_experts(expert_dirs, tmp_path)
    edit_json(dirs["code"] / file, **change)
    with pytest.raises(ExpertError, match=message) as err:
        read_expert("code", dirs["code"])
    assert file in str(err.value)


def test_missing_folder_and_duplicate_names(expert_dirs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ExpertError, match=r"folder .* not found"):
        read_expert("law", tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExpertError, match=r"manifest.json: file not found"):
        read_expert("law", tmp_path / "empty")
