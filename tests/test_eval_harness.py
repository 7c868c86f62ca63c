"""The evaluation harness: choices, grouping, the two-domain set, X-LoRA's classifier binding."""

import json
from pathlib import Path

import pytest
import torch

from loralab.base_model import load_base_model
from loralab.data.mixtures import two_domain_records
from loralab.data.records import Record
from loralab.evaluation.build import check_names, groups
from loralab.evaluation.systems import gold_choice, gold_label, pending_rounds

EXPERTS = ["law", "code", "medical"]


def test_gold_choice_and_label():
    assert gold_choice(Record("1", "code", "q", "r"), EXPERTS) == "code"
    assert gold_choice(Record("1", "general", "q", "r"), EXPERTS) is None
    assert gold_choice(Record("1", "medical+law", "q", "r"), EXPERTS) == ("medical", "law")
    assert gold_label(Record("1", "general", "q", "r"), EXPERTS) == "base"


def test_unknown_system_is_refused():
    with pytest.raises(ValueError, match="unknown system"):
        check_names(["base", "expert_tax"], EXPERTS)


def test_routed_systems_form_one_group_and_peft_systems_one_each():
    names = ["base", "xlora", "expert_law", "moelora", "arrow", "router_soft", "merge_ties"]
    assert groups(names) == [
        ["base", "expert_law", "moelora", "router_soft"],
        ["xlora"],
        ["arrow"],
        ["merge_ties"],
    ]


def test_pending_rounds_give_each_row_its_kth_choice():
    rounds = list(pending_rounds([["law", None], [], ["code"], [None, "law", "code"]]))
    assert rounds == [([0, 2, 3], ["law", "code", None]), ([0, 3], [None, "law"]), ([3], ["code"])]


def test_two_domain_set_is_deterministic_and_covers_every_pair(smoke_experts):
    cfg = smoke_experts["cfg"]
    first = two_domain_records(cfg.data, EXPERTS, per_pair=3)
    assert [r.id for r in first] == [
        r.id for r in two_domain_records(cfg.data, EXPERTS, per_pair=3)
    ]
    assert len(first) == 9
    pairs = {frozenset(r.domain.split("+")) for r in first}
    assert pairs == {
        frozenset(p) for p in (("law", "code"), ("law", "medical"), ("code", "medical"))
    }
    r = first[0]
    assert r.instruction.startswith("Answer both parts.") and "Part 2:" in r.response
    assert (
        len({part for r in first for part in r.id.removeprefix("pair:").split("+")}) == 18
    )  # no reuse


def test_xlora_runs_its_frozen_experts_without_dropout_in_training(smoke_experts):
    """As the MoE-LoRA gate does: in train mode, the same batch gives the same loss twice."""
    from loralab.artifacts import ADAPTER_CONFIG
    from loralab.baselines import build_xlora

    adapters = dict(smoke_experts["adapters"])
    dropout = {
        json.loads((Path(p) / ADAPTER_CONFIG).read_text())["lora_dropout"]
        for p in adapters.values()
    }
    assert min(dropout) > 0  # the experts were trained with dropout
    model = build_xlora(load_base_model(smoke_experts["cfg"].base_model)[0], adapters).train()
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        first, second = (model(input_ids=ids, labels=ids).loss for _ in range(2))
    assert torch.equal(first, second)


def test_xlora_classifier_is_bound_to_its_experts_and_base(smoke_experts, tmp_path):
    from loralab.artifacts import AdapterVerificationError
    from loralab.baselines import build_xlora
    from loralab.training.xlora import (
        XLORA_CLASSIFIER_FILE,
        load_xlora_classifier,
        save_xlora_classifier,
        xlora_classifier_state,
    )

    cfg, fingerprint = smoke_experts["cfg"], smoke_experts["base_fingerprint"]
    adapters = dict(smoke_experts["adapters"])
    trained = build_xlora(load_base_model(cfg.base_model)[0], adapters)
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    save_xlora_classifier(trained, tmp_path, adapters, fingerprint, {"val/loss": 1.5})

    fresh = build_xlora(load_base_model(cfg.base_model)[0], adapters)
    manifest = load_xlora_classifier(fresh, tmp_path, adapters, fingerprint)
    assert manifest["metrics"] == {"val/loss": 1.5}
    assert [e["name"] for e in manifest["experts"]] == EXPERTS
    for name, value in xlora_classifier_state(trained).items():
        assert torch.equal(xlora_classifier_state(fresh)[name], value)

    reordered = {d: adapters[d] for d in reversed(EXPERTS)}
    with pytest.raises(AdapterVerificationError, match="field 'experts'"):
        load_xlora_classifier(fresh, tmp_path, reordered, fingerprint)
    with pytest.raises(AdapterVerificationError, match="base_fingerprint"):
        load_xlora_classifier(fresh, tmp_path, adapters, "0" * 64)
    with (tmp_path / XLORA_CLASSIFIER_FILE).open("ab") as f:
        f.write(b"\0")
    with pytest.raises(AdapterVerificationError, match="sha256"):
        load_xlora_classifier(fresh, tmp_path, adapters, fingerprint)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(AdapterVerificationError, match="not a complete X-LoRA classifier"):
        load_xlora_classifier(fresh, tmp_path, adapters, fingerprint)


def test_a_code_only_evaluation_scores_pass_rates_without_nll_sets(smoke_experts, tmp_path):
    """experiment=quick_cpu_code's shape: no NLL, choice or ROUGE sets; pass@1 per system, only
    the generating systems, paired pass-rate tests."""
    from loralab.evaluation.harness import evaluate
    from tests.conftest import compose

    cfg = compose(
        "evaluate",
        [
            "experiment=smoke",
            "eval.systems=[base,expert_code,merge_ties]",
            "eval.sets=[]",
            "eval.choice_sets.sets=[]",
            "eval.generation.per_set=0",
            "eval.generation.mbpp=2",
            "eval.generation.humaneval=2",
            "eval.generation.systems=[base,expert_code]",
            "eval.cost.enabled=false",
            "eval.paired_tests=[[base,expert_code],[base,merge_ties]]",
        ],
        tmp_path,
    )
    results = evaluate(cfg, Path(smoke_experts["adapters"]["code"]).parent)
    have = {(m["system"], m["set"], m["metric"]) for m in results["metrics"]}
    assert have == {
        (s, g, "pass_rate") for s in ("base", "expert_code") for g in ("gen_code", "humaneval")
    }
    assert results["sets"] == [] and not any(results["paired_tests"].values())  # no NLL
    assert set(results["generations"]) == {"base", "expert_code"}
    assert [len(results["generations"]["base"][g]) for g in ("gen_code", "humaneval")] == [2, 2]
    assert set(results["paired_tests_accuracy"]) == {"base_vs_expert_code"}
