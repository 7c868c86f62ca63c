"""Per-call, per-row routing: one batch mixing adapter, base, gate and soft-mix rows (CPU, fp32)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from moelora import GATE, GateConfig, MoELoraConfig, MoELoraModel, RowRouting

ATOL = 1e-5  # fp32: the mixture sums the same products in another order than PEFT
MIX = {"law": 0.5, "code": 0.3, "medical": 0.2}
CHOICES = ["law", None, GATE, "code", MIX]  # one row each: adapter, base, gate, adapter, mix
BaseFactory = Callable[[], torch.nn.Module]


@pytest.fixture
def moe(expert_dirs: dict[str, Path], base_factory: BaseFactory) -> MoELoraModel:
    config = MoELoraConfig(gate=GateConfig(init_std=0.5, null_expert=True))
    return MoELoraModel.from_adapters(base_factory(), expert_dirs, config).eval()


def peft_model(base_factory: BaseFactory, expert_dirs: dict[str, Path], name: str) -> PeftModel:
    return PeftModel.from_pretrained(base_factory(), str(expert_dirs[name])).eval()


def peft_mixture(base_factory: BaseFactory, expert_dirs: dict[str, Path]) -> PeftModel:
    """PEFT's weighted sum of the three adapters (combination "cat" = sum_e w_e * delta_e)."""
    model = PeftModel.from_pretrained(base_factory(), str(expert_dirs["law"]), adapter_name="law")
    for name in ("code", "medical"):
        model.load_adapter(str(expert_dirs[name]), adapter_name=name)
    model.add_weighted_adapter(list(MIX), list(MIX.values()), "mix", combination_type="cat")
    model.set_adapter("mix")
    return model.eval()


def logits(model: torch.nn.Module, ids: torch.Tensor, **kwargs: object) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def prompts() -> torch.Tensor:
    return torch.randint(1, 96, (5, 7), generator=torch.Generator().manual_seed(3))


def test_mixed_batch_matches_peft_base_gate_and_weighted_sum_row_by_row(
    moe: MoELoraModel, base_factory: BaseFactory, expert_dirs: dict[str, Path]
) -> None:
    ids = prompts()
    routing = RowRouting.from_choices(CHOICES, moe.expert_names)
    mixed = logits(moe, ids, row_routing=routing)
    base = logits(base_factory(), ids)
    for row, name in ((0, "law"), (3, "code")):
        reference = logits(peft_model(base_factory, expert_dirs, name), ids)[row]
        assert not torch.allclose(reference, base[row], atol=1e-3)
        torch.testing.assert_close(mixed[row], reference, atol=ATOL, rtol=0)
    assert torch.equal(mixed[1], base[1])  # zero weights add exact zeros
    assert torch.equal(mixed[2], logits(moe, ids)[2])  # the gate row = the all-gate batch's row
    torch.testing.assert_close(mixed[2], logits(moe, ids[2:3])[0], atol=ATOL, rtol=0)
    assert not torch.allclose(mixed[2], base[2], atol=1e-3)
    weighted = logits(peft_mixture(base_factory, expert_dirs), ids)[4]
    torch.testing.assert_close(mixed[4], weighted, atol=ATOL, rtol=0)
    with moe.fixed_gate([0.0, 1.0, 0.0]):  # the ablation context: every row on "code"
        torch.testing.assert_close(logits(moe, ids)[3], mixed[3], atol=ATOL, rtol=0)


def test_topk_path_serves_the_same_mixed_batch(
    expert_dirs: dict[str, Path], base_factory: BaseFactory
) -> None:
    ids = prompts()
    config = MoELoraConfig(gate=GateConfig(init_std=0.5, top_k=2, null_expert=True))
    moe = MoELoraModel.from_adapters(base_factory(), expert_dirs, config).eval()
    routing = RowRouting.from_choices(CHOICES, moe.expert_names)
    dense = logits(moe, ids, row_routing=routing)
    moe.set_compute_path("topk")
    sparse = logits(moe, ids, row_routing=routing)
    torch.testing.assert_close(sparse, dense, atol=ATOL, rtol=0)
    assert torch.equal(sparse[1], logits(base_factory(), ids)[1])
    torch.testing.assert_close(sparse[2], logits(moe, ids)[2], atol=ATOL, rtol=0)
    peft = logits(peft_model(base_factory, expert_dirs, "law"), ids)[0]
    torch.testing.assert_close(sparse[0], peft, atol=ATOL, rtol=0)


def left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def greedy(
    model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, **kwargs: object
) -> torch.Tensor:
    """8 new tokens (no early stop, so rows stay comparable), greedy unless kwargs say otherwise."""
    options: dict[str, object] = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False}
    with torch.no_grad():
        out = model.generate(  # type: ignore[operator]
            input_ids=ids, attention_mask=mask, pad_token_id=0, **(options | kwargs)
        )
    return out[:, ids.shape[1] :]


def test_generate_with_kv_cache_and_left_padding_equals_each_row_alone(
    moe: MoELoraModel, base_factory: BaseFactory, expert_dirs: dict[str, Path]
) -> None:
    generator = torch.Generator().manual_seed(7)
    rows = [torch.randint(1, 96, (n,), generator=generator).tolist() for n in (5, 3, 6, 4, 2)]
    ids, mask = left_padded(rows)
    routing = RowRouting.from_choices(CHOICES, moe.expert_names)
    batched = greedy(moe, ids, mask, row_routing=routing)
    for row, choice in enumerate(CHOICES):
        alone = torch.tensor([rows[row]])
        one = RowRouting.from_choices([choice], moe.expert_names)
        assert torch.equal(
            batched[row], greedy(moe, alone, torch.ones_like(alone), row_routing=one)[0]
        )
    for row, name in ((0, "law"), (3, "code")):
        peft = peft_model(base_factory, expert_dirs, name)
        alone = torch.tensor([rows[row]])
        assert torch.equal(batched[row], greedy(peft, alone, torch.ones_like(alone))[0])
    alone = torch.tensor([rows[1]])
    assert torch.equal(batched[1], greedy(base_factory(), alone, torch.ones_like(alone))[0])
    alone = torch.tensor([rows[2]])
    assert torch.equal(batched[2], greedy(moe, alone, torch.ones_like(alone))[0])  # no routing


def test_step_by_step_forward_with_past_key_values_equals_generate(moe: MoELoraModel) -> None:
    ids, mask = left_padded([[5, 9, 14, 3], [7, 2], [11, 4, 8], [1, 2, 3, 4], [60, 61, 62]])
    routing = RowRouting.from_choices(CHOICES, moe.expert_names)
    expected = greedy(moe, ids, mask, row_routing=routing)
    steps, past, position = [], None, (mask.cumsum(-1) - 1).clamp_min(0)
    inputs = ids
    with torch.no_grad():
        for _ in range(expected.shape[1]):  # what a server does: one forward per step
            out = moe(
                input_ids=inputs,
                attention_mask=mask,
                position_ids=position,
                past_key_values=past,
                use_cache=True,
                row_routing=routing,
            )
            past, inputs = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            steps.append(inputs)
            mask = torch.cat([mask, torch.ones_like(inputs)], dim=1)
            position = position[:, -1:] + 1
    assert torch.equal(torch.cat(steps, dim=1), expected)


def test_num_return_sequences_repeats_each_rows_routing(moe: MoELoraModel) -> None:
    ids, mask = left_padded([[5, 9, 14], [7, 2, 30]])
    routing = RowRouting.from_choices(["law", GATE], moe.expert_names)
    sampled = greedy(
        moe, ids, mask, row_routing=routing, num_return_sequences=2, do_sample=True, top_k=1
    )
    assert sampled.shape == (4, 8)
    once = greedy(moe, ids, mask, row_routing=routing)
    assert torch.equal(sampled, once.repeat_interleave(2, dim=0))


def test_gate_bias_is_a_log_prior_on_gated_rows(moe: MoELoraModel) -> None:
    ids = prompts()[:2]
    routing = RowRouting.from_choices([GATE, GATE], moe.expert_names)
    # The first decoder layer's q / k / v (layers 0-2) read an input no routing has touched yet.
    plain = moe.gate_weights(ids)[:, :, :3]  # [B, T, 3, S]
    prior = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]])
    biased_routing = RowRouting(routing.weights, routing.gated, prior.log())
    biased = moe.gate_weights(ids, row_routing=biased_routing)[:, :, :3]
    expected = plain * prior[:, None, None, :]
    torch.testing.assert_close(biased, expected / expected.sum(-1, keepdim=True))
    hard = RowRouting(routing.weights, routing.gated, torch.tensor([[0.0, 80.0, 0.0, 0.0]] * 2))
    with torch.no_grad(), moe.fixed_gate([0.0, 1.0, 0.0]):
        code = moe(input_ids=ids).logits
    torch.testing.assert_close(logits(moe, ids, row_routing=hard), code, atol=ATOL, rtol=0)


def test_recorded_weights_show_fixed_rows_and_the_gate_on_gated_rows(moe: MoELoraModel) -> None:
    ids = prompts()
    routing = RowRouting.from_choices(CHOICES, moe.expert_names)
    weights = moe.gate_weights(ids, row_routing=routing)  # [B, T, L, S]
    assert moe.slot_names == ["law", "code", "medical", "none"]
    assert torch.equal(weights[0], torch.tensor([1.0, 0, 0, 0]).expand_as(weights[0]))
    assert torch.all(weights[1] == 0)
    assert torch.equal(weights[2], moe.gate_weights(ids)[2])
    assert torch.allclose(weights[4], torch.tensor([0.5, 0.3, 0.2, 0]).expand_as(weights[4]))


def test_from_choices_errors_name_the_row_and_value() -> None:
    names = ["law", "code"]
    with pytest.raises(ValueError, match=r"row 1: unknown expert 'lw'; experts: \['law', 'code'\]"):
        RowRouting.from_choices(["law", "lw"], names)
    with pytest.raises(ValueError, match=r"row 0: weight -0.5 for 'code'"):
        RowRouting.from_choices([{"code": -0.5}], names)
    with pytest.raises(ValueError, match=r"row 2: 3 weights for 2 experts"):
        RowRouting.from_choices([None, GATE, [0.1, 0.2, 0.3]], names)
    with pytest.raises(ValueError, match=r"row 0: weight nan for 'law'"):
        RowRouting.from_choices([[float("nan"), 0.0]], names)
    with pytest.raises(TypeError, match=r"row 0: choice must be None, an expert name"):
        RowRouting.from_choices([3], names)
    with pytest.raises(TypeError, match=r"one choice per row"):
        RowRouting.from_choices("law", names)
    with pytest.raises(ValueError, match=r"row 1: weight -1.0 for expert 0"):
        RowRouting(torch.tensor([[0.0, 1.0], [-1.0, 0.0]]), torch.zeros(2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"gated must be \[B=2\]"):
        RowRouting(torch.zeros(2, 2), torch.zeros(3, dtype=torch.bool))


def test_model_checks_the_routing_once_per_call(moe: MoELoraModel) -> None:
    ids = prompts()
    three = RowRouting.from_choices(["law", None, GATE], moe.expert_names)
    with pytest.raises(ValueError, match=r"row_routing has 3 rows but the batch has 5"):
        moe(input_ids=ids, row_routing=three)
    narrow = RowRouting.from_choices(["law"] * 5, ["law", "code"])
    with pytest.raises(ValueError, match=r"2 columns but the model has 3 experts"):
        moe(input_ids=ids, row_routing=narrow)
    routing = RowRouting.from_choices(CHOICES, moe.expert_names)
    bad_bias = RowRouting(routing.weights, routing.gated, torch.zeros(5, 3))
    with pytest.raises(ValueError, match=r"gate_bias has 3 columns but the gate has 4 slots"):
        moe(input_ids=ids, row_routing=bad_bias)
    with pytest.raises(ValueError, match=r"does not support beam search \(num_beams=2\)"):
        moe.generate(input_ids=ids, row_routing=routing, num_beams=2, max_new_tokens=2)
    with pytest.raises(TypeError, match=r"row_routing must be a RowRouting"):
        moe(input_ids=ids, row_routing=["law"] * 5)
    # nothing stays behind: the next call without a routing uses the gate everywhere
    assert torch.equal(
        logits(moe, ids),
        logits(moe, ids, row_routing=RowRouting.from_choices([GATE] * 5, moe.expert_names)),
    )


def test_routing_follows_a_batch_that_changes_shape() -> None:
    names = ["law", "code"]
    first = RowRouting.from_choices(["law", GATE], names)
    second = RowRouting.from_choices([{"code": 0.25}], names)
    joined = RowRouting.cat([first, second])
    assert joined.batch_size == 3 and (joined.any_gated, joined.all_gated) == (True, False)
    assert joined.weights.tolist() == [[1.0, 0.0], [0.0, 0.0], [0.0, 0.25]]
    kept = joined.select([2, 0])
    assert kept.weights.tolist() == [[0.0, 0.25], [1.0, 0.0]]
    assert kept.gated.tolist() == [False, False] and not kept.any_gated
    assert joined.repeat_interleave(2).gated.tolist() == [False, False, True, True, False, False]
    biased = RowRouting(first.weights, first.gated, torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"with and without gate_bias"):
        RowRouting.cat([biased, second])
    with pytest.raises(ValueError, match=r"row 1: gate_bias has NaN or \+inf"):
        RowRouting(first.weights, first.gated, torch.tensor([[0.0, 0, 0], [0, float("inf"), 0]]))
