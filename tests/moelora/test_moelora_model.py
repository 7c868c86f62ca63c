"""Correctness of MoE-LoRA on a tiny random Llama against PEFT and the base model (CPU, fp32)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from moelora import GateConfig, MoELoraConfig, MoELoraModel, read_expert

# fp32 on CPU: the mixture sums the same products in a different order than PEFT.
ATOL = 1e-5
Build = Callable[..., MoELoraModel]


@pytest.fixture
def build(expert_dirs: dict[str, Path], base_factory: Callable[[], torch.nn.Module]) -> Build:
    """build(**gate_config, compute_path=...) -> a MoE-LoRA model over the three experts."""

    def _build(**gate: object) -> MoELoraModel:
        compute_path = gate.pop("compute_path", "dense")
        config = MoELoraConfig(gate=GateConfig(**gate), compute_path=compute_path)  # type: ignore[arg-type]
        return MoELoraModel.from_adapters(base_factory(), expert_dirs, config).eval()

    return _build


def logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits


@pytest.mark.parametrize("index", range(3))
def test_one_hot_gate_matches_peft_with_that_adapter(
    build: Build,
    base_factory: Callable[[], torch.nn.Module],
    expert_dirs: dict[str, Path],
    tokens: torch.Tensor,
    index: int,
) -> None:
    name = list(expert_dirs)[index]
    peft = PeftModel.from_pretrained(base_factory(), str(expert_dirs[name])).eval()
    moe = build()
    one_hot = torch.nn.functional.one_hot(torch.tensor(index), 3).float()
    with moe.fixed_gate(one_hot):
        ours = logits(moe, tokens)
    reference = logits(peft, tokens)
    assert not torch.allclose(reference, logits(base_factory(), tokens), atol=1e-3)
    torch.testing.assert_close(ours, reference, atol=ATOL, rtol=0)


def test_zero_weights_and_null_slot_give_exactly_the_base_logits(
    build: Build, base_factory: Callable[[], torch.nn.Module], tokens: torch.Tensor
) -> None:
    base_logits = logits(base_factory(), tokens)
    moe = build(null_expert=True, top_k=1)
    with moe.fixed_gate([0.0, 0.0, 0.0, 1.0]):
        assert torch.equal(logits(moe, tokens), base_logits)
    for _, layer in moe.moe_layers():  # a learned gate that always picks "no expert"
        torch.nn.init.zeros_(layer.gate.proj.weight)
        layer.gate.proj.bias.data = torch.tensor([0.0, 0.0, 0.0, 50.0])
    assert torch.equal(logits(moe, tokens), base_logits)
    moe.set_compute_path("topk")
    assert torch.equal(logits(moe, tokens), base_logits)


def test_experts_with_different_ranks_are_stacked_with_exact_padding(
    build: Build, expert_dirs: dict[str, Path], expert_specs: dict[str, tuple[int, int, int]]
) -> None:
    moe = build()
    ranks = tuple(r for r, _, _ in expert_specs.values())
    layers = moe.moe_layers()
    assert len(layers) == 2 * 7 and all(layer.ranks == ranks for _, layer in layers)
    path, layer = layers[0]
    assert layer.lora_A.shape[:2] == (3, max(ranks))
    code = read_expert("code", expert_dirs["code"])
    a, b = code.weights[path]
    r, alpha, _ = expert_specs["code"]
    assert torch.equal(layer.lora_A[1, :r], a) and torch.all(layer.lora_A[1, r:] == 0)
    torch.testing.assert_close(layer.lora_B[1, :r], (b * alpha / r).t())
    assert torch.all(layer.lora_B[1, r:] == 0)


@pytest.mark.parametrize("null_expert", [False, True])
def test_dense_and_topk_paths_agree(build: Build, tokens: torch.Tensor, null_expert: bool) -> None:
    for top_k in (2, 3 + int(null_expert)):
        moe = build(top_k=top_k, null_expert=null_expert, init_std=0.5)
        dense = logits(moe, tokens)
        moe.set_compute_path("topk")
        torch.testing.assert_close(logits(moe, tokens), dense, atol=ATOL, rtol=0)


def test_topk_with_all_experts_equals_plain_softmax_gate(
    build: Build, tokens: torch.Tensor
) -> None:
    dense = build(init_std=0.5)
    sparse = build(init_std=0.5, top_k=3, compute_path="topk")
    sparse.load_gate_state_dict(dense.gate_state_dict())
    torch.testing.assert_close(logits(sparse, tokens), logits(dense, tokens), atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "gate", [{}, {"top_k": 1, "compute_path": "topk"}, {"kind": "mlp", "null_expert": True}]
)
def test_cached_and_uncached_greedy_generation_agree(build: Build, gate: dict[str, object]) -> None:
    moe = build(init_std=0.5, **gate)
    prompt = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(1))
    kwargs = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        cached = moe.generate(input_ids=prompt, use_cache=True, **kwargs)
        uncached = moe.generate(input_ids=prompt, use_cache=False, **kwargs)
    assert cached.shape == (2, 17)
    assert torch.equal(cached, uncached)


def test_only_gates_get_gradients_and_frozen_weights_stay_bit_identical(
    build: Build, tokens: torch.Tensor
) -> None:
    moe = build(top_k=2, noise_std=0.1).train()
    assert moe.non_gate_trainable() == []
    frozen = {n: p.detach().clone() for n, p in moe.named_parameters() if not p.requires_grad}
    gates_before = {k: v.clone() for k, v in moe.gate_state_dict().items()}
    optimizer = torch.optim.AdamW(moe.gate_parameters(), lr=1e-2)
    with moe.recording():
        out = moe(input_ids=tokens, labels=tokens)
        loss = out.loss + moe.aux_losses().total
    loss.backward()
    assert all(p.grad is None for n, p in moe.named_parameters() if n in frozen)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in moe.gate_parameters())
    optimizer.step()
    assert all(torch.equal(p, frozen[n]) for n, p in moe.named_parameters() if n in frozen)
    changed = [not torch.equal(v, gates_before[k]) for k, v in moe.gate_state_dict().items()]
    assert all(changed)


@pytest.mark.parametrize("compute_path", ["dense", "topk"])
def test_training_step_under_bf16_autocast_over_fp32_weights(
    build: Build, tokens: torch.Tensor, compute_path: str
) -> None:
    moe = build(top_k=2, compute_path=compute_path).train()
    with torch.autocast("cpu", dtype=torch.bfloat16), moe.recording():
        loss = moe(input_ids=tokens, labels=tokens).loss + moe.aux_losses().total
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in moe.gate_parameters())


def test_shared_scope_uses_one_gate_per_input_width(build: Build) -> None:
    moe = build(scope="shared")
    assert sorted(moe.gates()) == ["shared_in32", "shared_in48"]
    per_module = build()
    assert len(per_module.gates()) == 14
    assert sum(p.numel() for p in moe.gate_parameters()) == (32 + 1) * 3 + (48 + 1) * 3


def test_gate_weights_per_token_and_layer(build: Build, tokens: torch.Tensor) -> None:
    moe = build(null_expert=True, top_k=2, init_std=0.5)
    weights = moe.gate_weights(tokens)
    assert weights.shape == (2, 7, 14, 4)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 7, 14))
    assert torch.all((weights > 0).sum(-1) == 2)
    assert moe.slot_names == ["law", "code", "medical", "none"]


def test_gate_noise_only_in_training(build: Build, tokens: torch.Tensor) -> None:
    moe = build(noise_std=1.0)
    assert torch.equal(logits(moe, tokens), logits(moe, tokens))
    moe.train()
    assert not torch.equal(logits(moe, tokens), logits(moe, tokens))


def test_dense_model_traces_as_one_graph_and_compiles(build: Build, tokens: torch.Tensor) -> None:
    moe = build(top_k=2, null_expert=True)
    with torch.no_grad():
        explanation = torch._dynamo.explain(moe.base_model)(input_ids=tokens)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0)
    layer = moe.moe_layers()[0][1]
    x = torch.randn(2, 5, 32)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x))


def test_fixed_gate_rejects_wrong_length(build: Build) -> None:
    moe = build()
    with pytest.raises(ValueError, match=r"need 3 slot weights"), moe.fixed_gate([1.0, 0.0]):
        pass
    with pytest.raises(ValueError, match=r"weight -1.0 for expert 1"), moe.fixed_gate([1, -1, 0]):
        pass
