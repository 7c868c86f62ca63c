"""The evaluation's cost stage: routing inside the time to first token, absolute peak memory,
each system's own weights."""

import pytest
import torch

from loralab.evaluation.build import routed_model, routed_systems
from loralab.evaluation.cost import cost_prompts, measure_cost, served_routed
from loralab.evaluation.sets import build_eval_sets
from loralab.evaluation.systems import RoutedSystem
from loralab.measurement import MIB, weights_bytes
from tests.conftest import smoke_eval_env

EXPERTS = ["law", "code", "medical"]
KEYS = {"prefill_tokens_per_s", "decode_tokens_per_s", "ttft_ms", "peak_memory_mb", "weights_mb"}


def test_cost_routes_inside_ttft_and_counts_what_each_system_holds(smoke_experts, tmp_path):
    e = smoke_eval_env(smoke_experts, tmp_path)
    sets = build_eval_sets(e.cfg.data, e.cfg.eval, e.tok, EXPERTS)
    ids, records = cost_prompts(sets, 12, 3, torch.device("cpu"))
    assert ids.shape == (3, 12) and [r.domain for r in records] == ["law", "code", "medical"]
    routed = []

    def route(record):
        routed.append(record.id)
        return "law"

    router = RoutedSystem("router", lambda r: "code", route)
    with routed_model(e.shared, e.adapters, None) as model:
        cost = measure_cost(served_routed(model, router, records), ids, records, 4, repeats=3)
        assert routed == [records[0].id] * 4  # one warm-up + 3 timed first tokens, each routed
        moe = routed_systems(["moelora"], EXPERTS, None)["moelora"]
        gate = measure_cost(served_routed(model, moe, records), ids, records, 4, repeats=3)
        gate_bytes = sum(p.numel() * p.element_size() for p in model.gate_parameters())
        full = weights_bytes(model)
    assert set(cost) == KEYS and all(v > 0 for v in cost.values())
    assert cost["weights_mb"] == round((full - gate_bytes) / MIB, 1)  # the gate is not the router's
    assert gate["weights_mb"] == round(full / MIB, 1)
    if cost["peak_memory_mb"] is not None:  # absolute: at least the weights it runs on
        assert cost["peak_memory_mb"] > cost["weights_mb"]
    with pytest.raises(ValueError, match=r"lower eval\.cost\.prompt_tokens"):
        cost_prompts(sets, 10_000, 2, torch.device("cpu"))


def test_cost_is_measured_for_the_chosen_systems_only():
    from loralab.evaluation.cost import costed_systems

    names = ["base", "expert_law", "expert_code", "router", "moelora"]
    experts = ["law", "code"]
    assert costed_systems({"enabled": True, "systems": None}, names, experts) == set(names)
    chosen = {"enabled": True, "systems": ["expert_*", "moelora"]}
    assert costed_systems(chosen, names, experts) == {"expert_law", "expert_code", "moelora"}
    stale = {"enabled": True, "systems": ["router", "xlora"]}
    with pytest.raises(ValueError, match=r"eval\.cost\.systems: \['xlora'\] not in eval\.systems"):
        costed_systems(stale, names, experts)
    # cost off: nothing measured, and a list naming systems not evaluated is not an error
    assert costed_systems({**stale, "enabled": False}, names, experts) == set()
