"""The evaluation harness: systems' exactness, the two-domain set, sandboxed code checks."""

import pytest
import torch

from loralab.artifacts import load_expert
from loralab.base_model import load_base_model
from loralab.data.mixtures import two_domain_records
from loralab.data.records import Record
from loralab.evaluation.build import check_names
from loralab.evaluation.systems import (
    RequestLevelSystem,
    gold_choice,
    gold_label,
    weighted_adapters,
)

EXPERTS = ["law", "code", "medical"]


@pytest.fixture(scope="module")
def bank(smoke_experts):
    cfg = smoke_experts["cfg"]
    base, tok = load_base_model(cfg.base_model)
    model = load_expert(base, smoke_experts["adapters"], smoke_experts["base_fingerprint"]).eval()
    model.add_weighted_adapter(EXPERTS, [1 / 3] * 3, "merge_cat", combination_type="cat")
    model.eval()  # the merge's new dropout modules start in training mode
    ids = torch.tensor([tok("The patient signed the contract in Python.")["input_ids"]] * 2)
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _logits(model, batch, **kw):
    with torch.no_grad():
        return model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kw
        ).logits


def test_weighted_adapters_is_the_exact_weighted_sum(bank):
    model, batch = bank
    model.set_adapter("law")
    law = _logits(model, batch)
    with weighted_adapters(model, {"law": 1.0, "code": 0.0, "medical": 0.0}):
        torch.testing.assert_close(_logits(model, batch), law, rtol=0, atol=1e-5)
    model.set_adapter("merge_cat")
    cat = _logits(model, batch)
    with weighted_adapters(model, dict.fromkeys(EXPERTS, 1 / 3)):
        torch.testing.assert_close(_logits(model, batch), cat, rtol=0, atol=1e-5)
    model.set_adapter("law")  # scaling restored afterwards
    torch.testing.assert_close(_logits(model, batch), law, rtol=0, atol=0)


def test_request_level_choices_match_direct_adapters(bank):
    model, batch = bank
    recs = [Record("a", "law", "q", "r"), Record("b", "general", "q", "r")]
    mixed = RequestLevelSystem("oracle", model, lambda r: gold_choice(r, EXPERTS))
    sums, counts = mixed.nll(batch, recs)
    single = {name: RequestLevelSystem(name, model, lambda r, n=name: n) for name in ("law",)}
    law_sum, _ = single["law"].nll(batch, recs)
    base_sum, _ = RequestLevelSystem("base", model, lambda r: None).nll(batch, recs)
    torch.testing.assert_close(sums, torch.stack([law_sum[0], base_sum[1]]), rtol=1e-4, atol=1e-4)
    assert counts.tolist() == [batch["input_ids"].shape[1] - 1] * 2
    pair = Record("p", "law+code", "q", "r")
    best, _ = mixed.nll({k: v[:1] for k, v in batch.items()}, [pair])
    each = [
        RequestLevelSystem(d, model, lambda r, d=d: d).nll(
            {k: v[:1] for k, v in batch.items()}, [pair]
        )[0]
        for d in ("law", "code")
    ]
    assert float(best[0]) == pytest.approx(min(float(e[0]) for e in each), rel=1e-5)


def test_gold_choice_and_label():
    assert gold_choice(Record("1", "code", "q", "r"), EXPERTS) == "code"
    assert gold_choice(Record("1", "general", "q", "r"), EXPERTS) is None
    assert gold_choice(Record("1", "medical+law", "q", "r"), EXPERTS) == ("medical", "law")
    assert gold_label(Record("1", "general", "q", "r"), EXPERTS) == "base"


def test_unknown_system_is_refused():
    with pytest.raises(ValueError, match="unknown system"):
        check_names(["base", "expert_tax"], EXPERTS)


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


def test_request_level_results_are_shared_across_systems_without_changing_them(
    smoke_experts, bank, tmp_path
):
    from loralab.evaluation.harness import score_set
    from loralab.evaluation.sets import build_eval_sets
    from tests.conftest import compose

    model, _ = bank
    cfg = compose("evaluate", ["experiment=smoke"], tmp_path)
    _, tok = load_base_model(cfg.base_model)
    sets = build_eval_sets(cfg.data, cfg.eval, tok, EXPERTS)
    oracle = RequestLevelSystem("oracle", model, lambda r: gold_choice(r, EXPERTS))
    soft = RequestLevelSystem("soft", model, lambda r: {"law": 0.5, "code": 0.5})
    device = torch.device("cpu")
    memo: dict = {}
    for d in EXPERTS:
        expert = RequestLevelSystem(d, model, lambda r, d=d: d)
        for s in sets.values():
            score_set(expert, s, 4, tok.pad_token_id, device, memo)
    assert len(memo) == 3 * sum(len(s.records) for s in sets.values())
    for name in ("law", "two_domain"):  # one adapter per request; best of two per pair
        fresh = score_set(oracle, sets[name], 4, tok.pad_token_id, device)
        shared = score_set(oracle, sets[name], 4, tok.pad_token_id, device, memo)
        assert shared["n_tokens"] == fresh["n_tokens"]
        assert shared["nll_sum"] == pytest.approx(fresh["nll_sum"], rel=1e-5)
    size = len(memo)
    score_set(soft, sets["law"], 4, tok.pad_token_id, device, memo)  # a mixture: never shared
    assert len(memo) == size
