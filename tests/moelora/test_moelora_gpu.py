"""CUDA paths: bf16 against fp32, dense against top-k, cached generation, a bf16-mixed step.

Skipped without CUDA (see tests/conftest.py). The tolerances were set from the same checks run
with device "cpu" (bf16 is emulated there with the same rounding).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from moelora import GATE, GateConfig, MoELoraConfig, MoELoraModel, RowRouting

pytestmark = pytest.mark.gpu
BaseFactory = Callable[[], torch.nn.Module]


def build_on_cuda(
    base_factory: BaseFactory, expert_dirs: dict[str, Path], dtype: torch.dtype, **gate: object
) -> MoELoraModel:
    """Base moved to CUDA / dtype first, so experts take its dtype and gates stay float32."""
    compute_path = gate.pop("compute_path", "dense")
    config = MoELoraConfig(gate=GateConfig(init_std=0.5, **gate), compute_path=compute_path)  # type: ignore[arg-type]
    base = base_factory().to(device="cuda", dtype=dtype)
    return MoELoraModel.from_adapters(base, expert_dirs, config).eval()


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.float() - reference).norm() / reference.norm())


def test_one_hot_bf16_error_is_no_worse_than_peft_bf16(
    base_factory: BaseFactory, expert_dirs: dict[str, Path], tokens: torch.Tensor
) -> None:
    ids = tokens.cuda()
    fp32 = build_on_cuda(base_factory, expert_dirs, torch.float32)
    bf16 = build_on_cuda(base_factory, expert_dirs, torch.bfloat16)
    for index, folder in enumerate(expert_dirs.values()):
        one_hot = torch.nn.functional.one_hot(torch.tensor(index), 3).float()
        peft32 = PeftModel.from_pretrained(base_factory().cuda(), str(folder))
        peft16 = PeftModel.from_pretrained(
            base_factory().to("cuda", torch.bfloat16), str(folder), autocast_adapter_dtype=False
        )
        with torch.no_grad(), fp32.fixed_gate(one_hot), bf16.fixed_gate(one_hot):
            ours = relative_error(bf16(input_ids=ids).logits, fp32(input_ids=ids).logits)
            peft = relative_error(peft16(input_ids=ids).logits, peft32(input_ids=ids).logits)
        assert ours <= 1.5 * peft + 1e-3, (index, ours, peft)


def test_learned_gate_bf16_agrees_with_fp32(
    base_factory: BaseFactory, expert_dirs: dict[str, Path], tokens: torch.Tensor
) -> None:
    ids = tokens.cuda()
    with torch.no_grad():
        reference = build_on_cuda(base_factory, expert_dirs, torch.float32)(input_ids=ids).logits
        low = build_on_cuda(base_factory, expert_dirs, torch.bfloat16)(input_ids=ids).logits
    # Three random (large) experts mixed amplify bf16 rounding ~3x over one expert (~1.2%).
    assert relative_error(low, reference) < 0.08
    assert (low.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9


def test_dense_and_topk_agree_and_cache_is_exact_in_fp32(
    base_factory: BaseFactory, expert_dirs: dict[str, Path], tokens: torch.Tensor
) -> None:
    ids = tokens.cuda()
    model = build_on_cuda(base_factory, expert_dirs, torch.float32, top_k=2, null_expert=True)
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        model.set_compute_path("topk")
        sparse = model(input_ids=ids).logits
        kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
        cached = model.generate(input_ids=ids, use_cache=True, **kwargs)
        uncached = model.generate(input_ids=ids, use_cache=False, **kwargs)
    assert relative_error(sparse, dense) < 1e-5
    assert torch.equal(cached, uncached)


def test_dense_and_topk_layer_paths_agree_in_bf16(
    base_factory: BaseFactory, expert_dirs: dict[str, Path]
) -> None:
    # One layer, one input, so both paths see the same routing (in a whole bf16 model rounding
    # can flip a later top-k choice).
    model = build_on_cuda(base_factory, expert_dirs, torch.bfloat16, top_k=2, null_expert=True)
    layer = model.moe_layers()[4][1]
    x = torch.randn(64, layer.in_features, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        dense = layer(x)
        layer.compute_path = "topk"
        sparse = layer(x)
        layer.compute_path = "dense"
        reference = build_on_cuda(
            base_factory, expert_dirs, torch.float32, top_k=2, null_expert=True
        )
        exact = reference.moe_layers()[4][1](x.float())
    assert relative_error(sparse, dense.float()) < 1e-2
    assert relative_error(dense, exact) < 1e-2


def test_bf16_mixed_gate_training_step_only_moves_the_gate(
    base_factory: BaseFactory, expert_dirs: dict[str, Path], tokens: torch.Tensor
) -> None:
    ids = tokens.cuda()
    model = build_on_cuda(base_factory, expert_dirs, torch.bfloat16, top_k=2, noise_std=0.1).train()
    assert all(p.dtype == torch.float32 for p in model.gate_parameters())
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW(model.gate_parameters(), lr=1e-2)
    with torch.autocast("cuda", dtype=torch.bfloat16), model.recording():
        loss = model(input_ids=ids, labels=ids).loss + model.aux_losses().total
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.gate_parameters())


def test_mixed_row_routing_on_cuda_matches_cpu_and_the_base_row_is_exact(
    base_factory: BaseFactory, expert_dirs: dict[str, Path]
) -> None:
    ids = torch.randint(1, 96, (4, 7), generator=torch.Generator().manual_seed(3))
    config = MoELoraConfig(gate=GateConfig(init_std=0.5))
    cpu = MoELoraModel.from_adapters(base_factory(), expert_dirs, config).eval()
    gpu = build_on_cuda(base_factory, expert_dirs, torch.float32)
    gpu.load_gate_state_dict(cpu.gate_state_dict())
    mix = {"code": 0.5, "medical": 0.5}
    routing = RowRouting.from_choices(["law", None, GATE, mix], cpu.expert_names)  # on CPU
    with torch.no_grad():
        expected = cpu(input_ids=ids, row_routing=routing).logits
        got = gpu(input_ids=ids.cuda(), row_routing=routing).logits  # the model moves it
        base = base_factory().cuda()(input_ids=ids.cuda()).logits
        kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
        batched = gpu.generate(input_ids=ids.cuda(), row_routing=routing, **kwargs)
        alone = gpu.generate(input_ids=ids[2:3].cuda(), row_routing=routing.select([2]), **kwargs)
    assert relative_error(got.cpu(), expected) < 1e-4
    assert torch.equal(got[1], base[1])
    assert torch.equal(batched[2], alone[0])
