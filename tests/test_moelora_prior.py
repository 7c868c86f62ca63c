"""moelora_prior: the router's probabilities as a prior on every layer's gate logits (tiny model)."""

import math
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import pytest
import torch

from loralab.data.datamodule import DomainDataModule
from loralab.evaluation.build import routed_model
from loralab.evaluation.systems import GatePrior, row_routing
from loralab.routing.prior import gate_bias, slot_probs
from loralab.training.moelora_gate import GateTrainingModule
from moelora import GATE
from tests.conftest import smoke_eval_env

EXPERTS = ["law", "code", "medical"]
CPU = torch.device("cpu")


def test_slot_probabilities_handle_the_base_mass():
    probs = {"law": 0.5, "code": 0.2, "medical": 0.1, "base": 0.2}
    # no "none" slot: the base mass is no preference, spread evenly over the experts
    np.testing.assert_allclose(
        slot_probs(probs, EXPERTS), [0.5 + 0.2 / 3, 0.2 + 0.2 / 3, 0.1 + 0.2 / 3]
    )
    # a "none" slot (null expert) takes it
    np.testing.assert_allclose(slot_probs(probs, [*EXPERTS, "none"]), [0.5, 0.2, 0.1, 0.2])
    np.testing.assert_allclose(slot_probs({}, EXPERTS), [1 / 3] * 3)  # no decision
    bias = gate_bias(np.array([0.5, 0.0, 0.5]), 2.0, 1e-4)
    np.testing.assert_allclose(bias, [2 * math.log(0.5), 2 * math.log(1e-4), 2 * math.log(0.5)])
    torch.testing.assert_close(
        gate_bias(torch.tensor([0.5, 0.0]), 2.0, 1e-4),
        torch.tensor([2 * math.log(0.5), 2 * math.log(1e-4)]),
    )
    for scale, floor in ((-1.0, 1e-4), (1.0, 0.0), (1.0, 1.0)):
        with pytest.raises(ValueError, match="prior scale"):
            gate_bias(np.ones(3) / 3, scale, floor)


@pytest.fixture(scope="module")
def shared_and_batch(smoke_experts, tmp_path_factory):
    e = smoke_eval_env(smoke_experts, tmp_path_factory.mktemp("prior"))
    batch = next(iter(DomainDataModule(e.cfg.data, e.tok, EXPERTS).eval_dataloader("val")))
    return e.cfg, e.shared, e.tok, e.adapters, batch


def _logits(model, batch, choices):
    with torch.no_grad():
        return model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            row_routing=row_routing(choices, model.expert_names, CPU),
        ).logits


def test_the_prior_reaches_every_layer(shared_and_batch):
    _, shared, _, adapters, batch = shared_and_batch
    rows = batch["input_ids"].shape[0]
    with routed_model(shared, adapters, None) as model:  # a fresh (untrained) gate
        slots = model.gate_slot_names
        gate = _logits(model, batch, [GATE] * rows)
        for expert in EXPERTS:
            # one-hot prior, huge scale: the gate puts all its weight on that expert in every
            # layer, which is exactly that expert's adapter alone
            one_hot = slot_probs({expert: 1.0}, slots)
            prior = GatePrior(tuple(gate_bias(one_hot, 1.0, 1e-30).tolist()))
            alone = _logits(model, batch, [expert] * rows)
            torch.testing.assert_close(_logits(model, batch, [prior] * rows), alone)
            assert not torch.allclose(gate, alone, atol=1e-4)
        # scale 0: no prior, the plain gate; mixed rows (prior, gate, one expert) in one batch
        zero = GatePrior(tuple(gate_bias(slot_probs({"law": 0.9, "base": 0.1}, slots), 0.0, 1e-4)))
        torch.testing.assert_close(_logits(model, batch, [zero] * rows), gate)
        strong = GatePrior(tuple(gate_bias(slot_probs({"code": 1.0}, slots), 1.0, 1e-30)))
        mixed = _logits(model, batch, [strong, GATE, "law", *[None] * (rows - 3)])
        torch.testing.assert_close(mixed[0], _logits(model, batch, ["code"] * rows)[0])
        torch.testing.assert_close(mixed[1], gate[1])
        torch.testing.assert_close(mixed[2], _logits(model, batch, ["law"] * rows)[2])


def test_training_with_the_prior_moves_only_the_gate(shared_and_batch):
    from moelora import MoELoraConfig, MoELoraModel

    _, shared, _, adapters, batch = shared_and_batch
    with shared.lend("gate training") as base:
        model = MoELoraModel.from_adapters(base, adapters, MoELoraConfig(), shared.fingerprint)
        try:
            slots = model.gate_slot_names
            rows = batch["input_ids"].shape[0]
            one_hot = [slot_probs({EXPERTS[i % 3]: 1.0}, slots).tolist() for i in range(rows)]
            with_prior = {**batch, "prior": torch.tensor(one_hot, dtype=torch.float32)}
            module = GateTrainingModule(model, {}, EXPERTS, prior=(1.0, 1e-4))
            plain = GateTrainingModule(model, {}, EXPERTS)
            with model.recording():
                loss, _ = module(with_prior)
            with model.recording():
                loss_plain, _ = plain(batch)
            assert not torch.isclose(loss, loss_plain)  # the prior is in the training forward
            loss.backward()
            gate_params = {id(p) for p in model.gate_parameters()}
            grads = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
            assert grads and all(id(p) in gate_params for _, p in grads)
            assert all(
                p.grad is not None and p.grad.abs().sum() > 0 for p in model.gate_parameters()
            )
            assert module.model.non_gate_trainable() == []
            with pytest.raises(ValueError, match="no 'prior'"):
                module(batch)
        finally:
            model.unload()


def test_prior_systems_are_named_in_config_and_use_the_right_gate_scale_and_pooling():
    from loralab.evaluation.build import (
        PriorSetting,
        check_names,
        gate_of,
        needs_router,
        routed_systems,
    )

    names = ["moelora", "moelora_prior", "moelora_prior_infer", "moelora_prior_nobias",
             "moelora_prior_s2", "moelora_prior_s0.5", "moelora_prior_segments",
             "moelora_prior_infer_request_s0.5", "moelora_prior_infer_f0.05",
             "moelora_prior_infer_agree"]  # fmt: skip
    check_names(names, EXPERTS)
    for bad in ("moelora_prior_sx", "moelora_prior_tokens", "moelora_prior_s2_infer",
                "moelora_prior_f2", "moelora_prior_f0.1_s2"):  # fmt: skip
        with pytest.raises(ValueError, match="unknown system"):
            check_names([bad], EXPERTS)
    assert [gate_of(n) for n in names] == ["moelora", "moelora_prior", "moelora",
                                           *["moelora_prior"] * 4, *["moelora"] * 3]  # fmt: skip
    assert [needs_router(n) for n in names] == [False, *[True] * 2, False, *[True] * 6]

    from types import SimpleNamespace

    from loralab.data.records import Record
    from loralab.evaluation.build import RouterChoices

    request = {"law": 0.7, "code": 0.1, "medical": 0.1, "base": 0.1}
    segments = {"law": 0.5, "code": 0.5, "medical": 0.0, "base": 0.0}
    law_part = {"law": 0.9, "code": 0.1, "medical": 0.0, "base": 0.0}
    code_part = {"law": 0.1, "code": 0.9, "medical": 0.0, "base": 0.0}
    base_part = {"law": 0.2, "code": 0.0, "medical": 0.0, "base": 0.8}
    choices = RouterChoices.__new__(RouterChoices)  # its decisions, without loading a router
    choices.experts, choices.decisions = EXPERTS, {"r1": SimpleNamespace(probs=request)}
    # r1: a law paragraph and a code one (pooled: `segments`); r2: a law paragraph and a base one
    choices.segments = {
        "r1": [(60, law_part), (60, code_part)],
        "r2": [(60, law_part), (30, base_part)],
    }
    record = Record("r1", "law", "q", "a")
    trained = PriorSetting(scale=1.0, floor=1e-4, pool="request")
    systems = routed_systems(names, EXPERTS, choices, EXPERTS, prior=trained)
    p_request = np.log(np.maximum(slot_probs(request, EXPERTS), 1e-4))
    p_segments = np.log(np.maximum(slot_probs(segments, EXPERTS), 1e-4))
    for name, expected in (("moelora_prior", p_request), ("moelora_prior_infer", p_request),
                           ("moelora_prior_s2", 2 * p_request),
                           ("moelora_prior_s0.5", 0.5 * p_request),
                           ("moelora_prior_segments", p_segments),
                           ("moelora_prior_infer_request_s0.5", 0.5 * p_request),
                           ("moelora_prior_infer_f0.05",
                            np.log(np.maximum(slot_probs(request, EXPERTS), 0.05)))):  # fmt: skip
        bias = systems[name].choose(record)
        assert isinstance(bias, GatePrior)
        np.testing.assert_allclose(bias.bias, expected, rtol=1e-6)
    # a gate trained with segment pooling: its prior systems pool so unless named otherwise
    by_segments = routed_systems(
        names, EXPERTS, choices, EXPERTS, prior=PriorSetting(pool="segments")
    )
    np.testing.assert_allclose(by_segments["moelora_prior"].choose(record).bias, p_segments)
    # `agree`: two experts' paragraphs get no prior (every slot the same bias: the gate alone)...
    assert np.ptp(systems["moelora_prior_infer_agree"].choose(record).bias) == 0
    # ... one expert's paragraph beside a base one keeps the length-weighted prior
    r2_pooled = {"law": (60 * 0.9 + 30 * 0.2) / 90, "code": 60 * 0.1 / 90, "base": 30 * 0.8 / 90}
    np.testing.assert_allclose(
        systems["moelora_prior_infer_agree"].choose(Record("r2", "law", "q", "a")).bias,
        np.log(np.maximum(slot_probs(r2_pooled, EXPERTS), 1e-4)), rtol=1e-6,
    )  # fmt: skip
    assert systems["moelora_prior_nobias"].choose(record) is GATE
    with pytest.raises(ValueError, match="needs the router"):
        routed_systems(["moelora_prior"], EXPERTS, None)


def test_request_segments_are_paragraphs_with_short_ones_joined():
    from loralab.routing.prior import request_segments

    law = "A tenant signed a lease and the landlord kept the deposit after the move."
    code = "Write a Python function that returns the longest increasing subsequence."
    two = f"Answer both parts.\n\nPart 1:\n{law}\n\nPart 2:\n{code}"
    assert request_segments(two) == [f"Answer both parts.\n\nPart 1:\n{law}", f"Part 2:\n{code}"]
    assert request_segments(law) == [law]  # no blank line: one segment
    assert request_segments(f"{law}\n \n\nThanks!") == [f"{law}\n\nThanks!"]  # short tail
    assert request_segments("hi") == ["hi"]
    many = "\n\n".join(f"{law} ({i})" for i in range(10))
    parts = request_segments(many, max_segments=3)
    assert len(parts) == 3 and parts[2].count(law) == 8


class _KeywordRouter:
    """Routes a text by the first domain word it contains ("court" -> law ...), a fixed
    probability; "???" gets no decision (no probabilities)."""

    WORDS: ClassVar[dict[str, str]] = {"court": "law", "python": "code", "patient": "medical"}

    def __init__(self):
        self.calls = []

    def route_batch(self, texts):
        self.calls.append(list(texts))
        out = []
        for text in texts:
            label = next((d for w, d in self.WORDS.items() if w in text), "base")
            probs = {} if "???" in text else {d: 0.02 for d in [*EXPERTS, "base"]}
            if probs:
                probs[label] = 0.94
            out.append(SimpleNamespace(label=label, probs=probs))
        return out


def test_pooled_probabilities_average_the_paragraphs_by_length():
    from loralab.routing.prior import route_pooled

    law = "The court ruled on the appeal " + "x" * 30  # 60 characters
    code = "A python loop " + "y" * 106  # 120 characters
    router = _KeywordRouter()
    texts = [f"{law}\n\n{code}", law, f"{law}\n\n??? an unclear paragraph, long enough to stand"]
    pooled = route_pooled(router, texts, "segments")
    assert router.calls == [[law, code, law, law, "??? an unclear paragraph, long enough to stand"]]
    assert pooled[0]["law"] == pytest.approx((60 * 0.94 + 120 * 0.02) / 180)
    assert pooled[0]["code"] == pytest.approx((60 * 0.02 + 120 * 0.94) / 180)
    assert sum(pooled[0].values()) == pytest.approx(1.0)
    assert pooled[1]["law"] == pytest.approx(0.94)
    assert pooled[2]["law"] == pytest.approx(0.94)  # the paragraph without a decision counts 0
    whole = route_pooled(router, texts[:1], "request")
    assert whole[0]["law"] == pytest.approx(0.94)  # the whole request names the first domain
    assert route_pooled(router, ["??? nothing"], "segments") == [{}]
    # `agree`: the segments' prior when the paragraphs name one expert, else none
    chat = "Thanks for reading this, and have a lovely day " + "z" * 40  # no domain word: base
    agree = route_pooled(router, [*texts, f"{law}\n\n{chat}", f"{chat}\n\n{chat}"], "agree")
    assert agree[0] == {}  # law and code
    assert agree[1:3] == pooled[1:3]
    assert agree[3] == route_pooled(router, [f"{law}\n\n{chat}"], "segments")[0]
    assert agree[3]["law"] == pytest.approx((60 * 0.94 + len(chat) * 0.02) / (60 + len(chat)))
    assert agree[4] == {}  # only base
    with pytest.raises(ValueError, match="pool"):
        route_pooled(router, texts, "tokens")


def test_a_one_paragraph_text_reuses_its_whole_request_decision():
    from loralab.routing.prior import route_segments

    law = "The court ruled on the appeal " + "x" * 30
    code = "A python loop " + "y" * 106
    texts = [law, f"{law}\n\n{code}"]
    router = _KeywordRouter()
    whole = router.route_batch(texts)
    reused = route_segments(router, texts, whole)
    assert router.calls[1:] == [[law, code]]  # only the two-paragraph text is split and routed
    assert reused == route_segments(_KeywordRouter(), texts)
    assert reused[0] == [(len(law), whole[0].probs)]


def test_router_priors_are_cached_per_router_version_and_pooling(tmp_path):
    from loralab.data.records import Record
    from loralab.routing.prior import RouterPriors
    from router import HashingEncoder
    from tests.router.tests_router_helpers import QUESTIONS, fit_toy_router

    fit_toy_router(HashingEncoder()).save(tmp_path / "router")
    cache = tmp_path / "priors.json"
    two = f"{QUESTIONS['law']}\n\n{QUESTIONS['code']}"
    records = [Record("a", "law", QUESTIONS["law"], "x"), Record("b", "law", two, "y")]
    whole = RouterPriors(tmp_path / "router", cache, "request")
    assert whole.prepare(records) == 2 and whole.prepare(records) == 0
    assert RouterPriors(tmp_path / "router", cache, "request").prepare(records) == 0  # cached
    split = RouterPriors(tmp_path / "router", cache, "segments")
    assert split.prepare(records) == 2  # another pooling: routed again, not read from the cache
    assert split.probs["a"] == pytest.approx(whole.probs["a"])  # one paragraph: the same
    # the whole request leans to code; its paragraphs, one law and one code, split the prior
    assert whole.probs["b"]["code"] > 0.7
    assert split.probs["b"]["law"] > whole.probs["b"]["law"] + 0.2
    with pytest.raises(ValueError, match="pool"):
        RouterPriors(tmp_path / "router", cache, "tokens")
