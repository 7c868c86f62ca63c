"""Routed systems on one MoE-LoRA model: equal to PEFT / the base model, each single choice scored
once and shared, gate statistics from the scoring pass, generation shared and equal to PEFT."""

import pytest
import torch

from loralab.artifacts import load_expert
from loralab.base_model import load_base_model
from loralab.evaluation.build import routed_model, routed_systems
from loralab.evaluation.generation import GenerationItem, Generator
from loralab.evaluation.nll import batch_nll
from loralab.evaluation.scoring import GateRecorder, RoutedScorer
from loralab.evaluation.sets import build_eval_sets
from loralab.evaluation.systems import RoutedSystem
from tests.conftest import smoke_eval_env

EXPERTS = ["law", "code", "medical"]
CPU = torch.device("cpu")
BATCH = 4


@pytest.fixture(scope="module")
def setup(smoke_experts, tmp_path_factory):
    e = smoke_eval_env(smoke_experts, tmp_path_factory.mktemp("eval"))
    sets = build_eval_sets(e.cfg.data, e.cfg.eval, e.tok, EXPERTS)
    return e.cfg, e.shared, e.tok, sets, e.adapters


def _peft_nll(cfg, adapters, fingerprint, sets, tok, adapter):
    """Per-set per-example NLL sums of PEFT with one adapter (None: the plain base), on a base
    model of its own."""
    base, _ = load_base_model(cfg.base_model)
    model = base if adapter is None else load_expert(base, adapters, fingerprint).eval()
    if adapter == "merge_cat":
        model.add_weighted_adapter(EXPERTS, [1 / 3] * 3, "merge_cat", combination_type="cat")
        model.eval()
    if adapter is not None:
        model.set_adapter(adapter)
    out = {}
    with torch.no_grad():
        for name, s in sets.items():
            sums = [0.0] * len(s.records)
            for idx, batch, _ in s.batches(BATCH, tok.pad_token_id, CPU):
                logits = model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
                for i, v in zip(idx, batch_nll(logits, batch["labels"])[0], strict=True):
                    sums[i] = float(v)
            out[name] = sums
    return out


def test_nll_from_the_kept_positions_equals_the_full_log_likelihood(setup):
    from loralab.evaluation.nll import scored_positions

    _, shared, tok, sets, _ = setup
    _, batch, _ = next(sets["two_domain"].batches(BATCH, tok.pad_token_id, CPU))
    labels = batch["labels"]
    keep = scored_positions(labels)
    assert keep < labels.shape[1]  # the prompts are not scored
    with torch.no_grad():
        full = shared.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        kept = shared.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            logits_to_keep=keep,
        )
    sums, counts = batch_nll(kept.logits, labels)
    logp = torch.log_softmax(full.logits[:, :-1].float(), -1)  # by hand, every position
    mask = labels[:, 1:] != -100
    target = labels[:, 1:].clamp_min(0)
    expected = -(logp.gather(-1, target[..., None])[..., 0] * mask).sum(1)
    torch.testing.assert_close(sums, expected, rtol=1e-5, atol=1e-4)
    assert counts.tolist() == mask.sum(1).tolist()


def test_routed_systems_equal_peft_and_share_each_single_choice(setup):
    cfg, shared, tok, sets, adapters = setup
    names = ["base", "expert_law", "expert_code", "expert_medical", "oracle", "merge_cat"]
    systems = routed_systems(names, EXPERTS, None)
    batches = sum(len(list(s.batches(BATCH, tok.pad_token_id, CPU))) for s in sets.values())
    with routed_model(shared, adapters, None) as model:
        scorer = RoutedScorer(model, sets, BATCH, tok.pad_token_id, CPU)
        scorer.fill(list(systems.values()))
        assert scorer.forwards == 4 * batches  # base + 3 experts, once per example
        scored = {n: scorer.score(s) for n, s in systems.items() if n != "merge_cat"}
        assert scorer.forwards == 4 * batches  # base, experts and oracle read the table
        scored["merge_cat"] = scorer.score(systems["merge_cat"])
        assert scorer.forwards == 5 * batches  # a mixture runs its own forward
    for name, adapter in [("base", None), ("expert_law", "law"), ("merge_cat", "merge_cat")]:
        reference = _peft_nll(cfg, adapters, shared.fingerprint, sets, tok, adapter)
        for set_name, sums in reference.items():
            assert scored[name][set_name]["nll_sum"] == pytest.approx(sums, rel=1e-5, abs=1e-4)
    for set_name, s in sets.items():
        for i, record in enumerate(s.records):
            gold = [f"expert_{d}" for d in record.domain.split("+") if d in EXPERTS] or ["base"]
            best = min(scored[g][set_name]["nll_sum"][i] for g in gold)
            assert scored["oracle"][set_name]["nll_sum"][i] == best


def test_a_mixed_batch_gives_each_row_its_own_choice_in_one_forward(setup):
    _, shared, tok, sets, adapters = setup
    law = sets["law"]
    picks = [EXPERTS[i % 3] if i % 4 else None for i in range(len(law.records))]
    chooser = dict(zip((r.id for r in law.records), picks, strict=True))
    mixed = RoutedSystem("router", lambda r: chooser.get(r.id))
    with routed_model(shared, adapters, None) as model:
        one = RoutedScorer(model, {"law": law}, BATCH, tok.pad_token_id, CPU)
        got = one.score(mixed)["law"]["nll_sum"]
        assert one.forwards == len(list(law.batches(BATCH, tok.pad_token_id, CPU)))
        each = RoutedScorer(model, {"law": law}, BATCH, tok.pad_token_id, CPU)
        each.fill([RoutedSystem(str(c), lambda r, c=c: c) for c in [None, *EXPERTS]])
    for i, pick in enumerate(picks):
        assert got[i] == pytest.approx(each.table[("law", i, pick)][0], rel=1e-5, abs=1e-4)


def test_gate_statistics_come_from_the_scoring_pass(setup):
    _, shared, tok, sets, adapters = setup
    moe = routed_systems(["moelora"], EXPERTS, None)["moelora"]
    with routed_model(shared, adapters, None) as model:
        scorer = RoutedScorer(model, sets, BATCH, tok.pad_token_id, CPU)
        recorder = GateRecorder(model.slot_names, 2, tok)
        scorer.score(moe, recorder)
        assert scorer.forwards == sum(
            len(list(s.batches(BATCH, tok.pad_token_id, CPU))) for s in sets.values()
        )
        summary = recorder.summary()
        law = sets["law"]  # the old way: a second pass of gate_weights over the set
        total, count = torch.zeros(len(model.slot_names)), 0
        for _, batch, _ in law.batches(BATCH, tok.pad_token_id, CPU):
            w = model.gate_weights(batch["input_ids"], batch["attention_mask"]).mean(2)
            mask = batch["labels"] != -100
            total += w[mask].sum(0)
            count += int(mask.sum())
    expected = (total / count).tolist()
    assert list(summary["gate_usage"]["law"].values()) == pytest.approx(expected, abs=1e-5)
    assert set(summary["gate_usage"]) == set(sets)
    heatmaps = summary["heatmaps"]
    assert len(heatmaps) == 2
    for i, h in enumerate(heatmaps):
        assert len(h["weights"]) == len(h["tokens"]) > 0
        assert h["domains"] == sets["two_domain"].records[i].domain.split("+")


def test_generation_is_shared_and_equals_peft_one_request_at_a_time(setup):
    cfg, shared, tok, sets, adapters = setup
    items = [GenerationItem(r) for r in sets["medical"].records[:3]]
    gen_cfg = {"max_new_tokens": 6, "max_prompt_tokens": 48, "timeout_s": 5}
    generator = Generator({"gen_medical": items}, tok, gen_cfg, 8, CPU)
    systems = routed_systems(["expert_law", "oracle"], EXPERTS, None)
    systems["law_rows"] = RoutedSystem("law_rows", lambda r: ("law", "code"))  # best-of: first
    with routed_model(shared, adapters, None) as model:
        replies = {n: generator.routed(model, s)["gen_medical"] for n, s in systems.items()}
    assert all(a is b for a, b in zip(replies["expert_law"], replies["law_rows"], strict=True))
    base, _ = load_base_model(cfg.base_model)
    peft = load_expert(base, adapters, shared.fingerprint).eval()
    peft.set_adapter("law")
    for item, reply in zip(items, replies["expert_law"], strict=True):
        ids = torch.tensor([generator.prompts["gen_medical"][items.index(item)]])
        out = peft.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        assert reply["reply"] == tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        assert reply["id"] == item.record.id
