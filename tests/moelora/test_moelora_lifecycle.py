"""Unwrapping (unload, with-block), PEFT-wrapped targets, hot add / remove of experts, gate growth."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from loralab.base_model import weights_fingerprint
from moelora import (
    GATE,
    ExpertError,
    GateConfig,
    GateFileError,
    MoELoraConfig,
    MoELoraLinear,
    MoELoraModel,
    RowRouting,
    load_moelora,
    read_expert,
    save_gate,
)

ATOL = 1e-5
BaseFactory = Callable[[], torch.nn.Module]
CHOICES = ["law", None, GATE, "code", {"law": 0.5, "code": 0.3, "medical": 0.2}]


def logits(model: torch.nn.Module, ids: torch.Tensor, **kwargs: object) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def ids() -> torch.Tensor:
    return torch.randint(1, 96, (5, 7), generator=torch.Generator().manual_seed(11))


def test_unload_gives_back_the_untouched_base_model(
    expert_dirs: dict[str, Path], base_factory: BaseFactory
) -> None:
    base = base_factory()
    base.lm_head.weight.requires_grad_(False)  # a caller's own choice, restored after unload
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    fingerprint, before = weights_fingerprint(base), logits(base, ids())
    state = {k: v.clone() for k, v in base.state_dict().items()}
    modules = dict(base.named_modules())
    model = MoELoraModel.from_adapters(base, expert_dirs).eval()
    assert weights_fingerprint(base) != fingerprint  # wrapped: gates and renamed linears
    assert model.non_gate_trainable() == [] and all(
        p.requires_grad for p in model.gate_parameters()
    )
    logits(model, ids(), row_routing=RowRouting.from_choices(CHOICES, model.expert_names))
    assert model.unload() is base
    assert weights_fingerprint(base) == fingerprint
    assert base.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in base.state_dict().items())
    assert all(module is modules[name] for name, module in base.named_modules())
    assert {n: p.requires_grad for n, p in base.named_parameters()} == flags
    assert torch.equal(logits(base, ids()), before)
    with pytest.raises(RuntimeError, match=r"was unloaded .* build a new one"):
        model(input_ids=ids())
    with pytest.raises(RuntimeError, match=r"was unloaded"):
        model.add_expert(read_expert("law", expert_dirs["law"]))


def test_with_block_unloads_on_exit_even_after_an_error(
    expert_dirs: dict[str, Path], base_factory: BaseFactory
) -> None:
    base = base_factory()
    before = logits(base, ids())
    wrapped = MoELoraModel.from_adapters(base, expert_dirs)
    with pytest.raises(ValueError, match=r"row_routing has 1 rows"), wrapped as model:
        assert isinstance(base.model.layers[0].mlp.up_proj, MoELoraLinear)
        model(input_ids=ids(), row_routing=RowRouting.from_choices(["law"], model.expert_names))
    assert isinstance(base.model.layers[0].mlp.up_proj, torch.nn.Linear)
    assert torch.equal(logits(base, ids()), before)
    # the base can be wrapped again after it was given back
    with MoELoraModel.from_adapters(base, expert_dirs) as again:
        assert len(again.moe_layers()) == 14


def test_peft_wrapped_targets_keep_their_adapter_and_unload_back_to_peft(
    expert_dirs: dict[str, Path], base_factory: BaseFactory
) -> None:
    """One base model in memory: PEFT holds "law" as a normal adapter, MoE-LoRA wraps the base
    layers underneath it."""
    peft = PeftModel.from_pretrained(base_factory(), str(expert_dirs["law"])).eval()
    peft_law = logits(peft, ids())
    with peft.disable_adapter():
        base = logits(peft, ids())
    lora_layer = peft.get_base_model().model.layers[0].self_attn.q_proj
    original = lora_layer.base_layer
    moe = MoELoraModel.from_adapters(peft.get_base_model(), expert_dirs).eval()
    assert isinstance(lora_layer.base_layer, MoELoraLinear)
    zeros = RowRouting.from_choices([None] * 5, moe.expert_names)
    assert torch.equal(logits(moe, ids(), row_routing=zeros), peft_law)  # PEFT's law on top
    with peft.disable_adapter():
        code = logits(
            moe, ids(), row_routing=RowRouting.from_choices(["code"] * 5, moe.expert_names)
        )
    reference = logits(PeftModel.from_pretrained(base_factory(), str(expert_dirs["code"])), ids())
    torch.testing.assert_close(code, reference, atol=ATOL, rtol=0)
    moe.unload()
    assert lora_layer.base_layer is original
    assert torch.equal(logits(peft, ids()), peft_law)
    with peft.disable_adapter():
        assert torch.equal(logits(peft, ids()), base)


@pytest.fixture
def fourth_expert(
    tmp_path: Path, base_factory: BaseFactory, expert_writer: Callable[..., Path]
) -> Path:
    """Rank 8 (above every resident rank), attention projections only (a subset)."""
    return expert_writer(
        tmp_path / "legal2",
        base_factory(),
        "legal2",
        8,
        16,
        21,
        target_modules=["q_proj", "v_proj"],
    )


def test_add_and_remove_an_expert_between_calls(
    expert_dirs: dict[str, Path], base_factory: BaseFactory, fourth_expert: Path
) -> None:
    config = MoELoraConfig(gate=GateConfig(init_std=0.5, null_expert=True))
    moe = MoELoraModel.from_adapters(base_factory(), expert_dirs, config).eval()
    stacked = {
        path: (layer.lora_A.clone(), layer.lora_B.clone()) for path, layer in moe.moe_layers()
    }
    before = logits(moe, ids(), row_routing=RowRouting.from_choices(CHOICES, moe.expert_names))
    moe.add_expert(read_expert("legal2", fourth_expert))
    assert moe.expert_names == ["law", "code", "medical", "legal2"]
    assert moe.gate_expert_names == ["law", "code", "medical"]
    assert moe.slot_names == ["law", "code", "medical", "legal2", "none"]
    layer = dict(moe.moe_layers())["model.layers.0.self_attn.q_proj"]
    assert layer.ranks == (4, 2, 6, 8) and layer.lora_A.shape == (4, 8, 32)
    assert dict(moe.moe_layers())["model.layers.0.mlp.up_proj"].ranks == (4, 2, 6, 0)
    after = logits(moe, ids(), row_routing=RowRouting.from_choices(CHOICES, moe.expert_names))
    assert torch.equal(after, before)  # bit-identical for the experts already there
    assert torch.all(moe.gate_weights(ids())[..., 3] == 0)  # the gate gives it nothing
    new = logits(moe, ids(), row_routing=RowRouting.from_choices(["legal2"] * 5, moe.expert_names))
    peft = PeftModel.from_pretrained(base_factory(), str(fourth_expert)).eval()
    torch.testing.assert_close(new, logits(peft, ids()), atol=ATOL, rtol=0)

    moe.remove_expert("legal2")
    assert moe.expert_names == ["law", "code", "medical"]
    for path, layer in moe.moe_layers():
        assert torch.equal(layer.lora_A, stacked[path][0])
        assert torch.equal(layer.lora_B, stacked[path][1])
    assert torch.equal(
        logits(moe, ids(), row_routing=RowRouting.from_choices(CHOICES, moe.expert_names)), before
    )


def test_add_and_remove_refuse_what_does_not_fit(
    expert_dirs: dict[str, Path],
    base_factory: BaseFactory,
    fourth_expert: Path,
    tmp_path: Path,
) -> None:
    moe = MoELoraModel.from_adapters(base_factory(), expert_dirs)
    with pytest.raises(ExpertError, match=r"expert 'law' is already resident"):
        moe.add_expert(read_expert("law", expert_dirs["law"]))
    other = Path(shutil.copytree(fourth_expert, tmp_path / "other"))
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["base_model"] = {"name": "other", "fingerprint": "f2"}
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExpertError, match=r"base fingerprint f2 \(other\), but this model's base"):
        moe.add_expert(read_expert("other", other))
    adapter = read_expert("legal2", fourth_expert)
    q_proj = adapter.weights["model.layers.0.self_attn.q_proj"]
    extra = {**adapter.weights, "model.layers.0.mlp.nope": q_proj}
    with pytest.raises(
        ExpertError,
        match=r"targets modules this model does not wrap: \['model.layers.0.mlp.nope'\]",
    ):
        moe.add_expert(replace(adapter, weights=extra))
    wide = {**adapter.weights, "model.layers.0.self_attn.q_proj": (torch.zeros(8, 64), q_proj[1])}
    with pytest.raises(
        ExpertError,
        match=r"'model.layers.0.self_attn.q_proj' maps 64->32, the wrapped layer maps 32->32",
    ):
        moe.add_expert(replace(adapter, weights=wide))
    with pytest.raises(ExpertError, match=r"'code' is one of the gate's experts"):
        moe.remove_expert("code")
    with pytest.raises(ExpertError, match=r"no resident expert 'legal2'"):
        moe.remove_expert("legal2")
    assert moe.expert_names == ["law", "code", "medical"]  # nothing half-done


@pytest.mark.parametrize(
    "gate", [GateConfig(null_expert=True, init_std=0.3), GateConfig(kind="mlp", hidden_size=8)]
)
def test_gate_grows_to_new_experts_keeping_the_trained_slots(
    expert_dirs: dict[str, Path], base_factory: BaseFactory, tmp_path: Path, gate: GateConfig
) -> None:
    two = {name: expert_dirs[name] for name in ("law", "code")}
    trained = MoELoraModel.from_adapters(base_factory(), two, MoELoraConfig(gate=gate))
    for parameter in trained.gate_parameters():  # "training": anything but the initial values
        torch.nn.init.normal_(parameter, std=1.0)
    folder = save_gate(trained, tmp_path / "gate")
    with pytest.raises(GateFileError, match=r"allow_new_experts=True warm-starts"):
        load_moelora(base_factory(), folder, experts=expert_dirs)
    torch.manual_seed(123)
    grown = load_moelora(base_factory(), folder, experts=expert_dirs, allow_new_experts=True)
    torch.manual_seed(123)
    fresh = MoELoraModel.from_adapters(base_factory(), expert_dirs, MoELoraConfig(gate=gate))
    assert grown.gate_expert_names == ["law", "code", "medical"]
    old, new = trained.gate_state_dict(), grown.gate_state_dict()
    init = fresh.gate_state_dict()
    for key, gate_module in grown.gates().items():
        weight_name, bias_name = gate_module.slot_parameter_names()
        for name in (weight_name, bias_name):
            full = f"{key}.{name}"
            saved_rows = [0, 1, 2] if gate.null_expert else [0, 1]  # law, code (, none)
            grown_rows = [0, 1, 3] if gate.null_expert else [0, 1]
            assert torch.equal(new[full][grown_rows], old[full][saved_rows])
            assert torch.equal(new[full][2], init[full][2])  # medical: a fresh gate's init
        for name in gate_module.state_dict():
            if name not in (weight_name, bias_name):  # the mlp's hidden layer is kept whole
                assert torch.equal(new[f"{key}.{name}"], old[f"{key}.{name}"])
    save_gate(grown, tmp_path / "grown")  # the grown gate saves and reloads as usual
    assert load_moelora(base_factory(), tmp_path / "grown").gate_expert_names == [
        "law",
        "code",
        "medical",
    ]
    fewer = {name: expert_dirs[name] for name in ("law", "medical")}
    with pytest.raises(GateFileError, match=r"that the model lacks"):
        load_moelora(base_factory(), folder, experts=fewer, allow_new_experts=True)
