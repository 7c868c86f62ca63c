"""moelora_prior: the router's probabilities as a prior on every layer's gate logits (tiny model)."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from loralab.base_model import load_base_model, weights_fingerprint
from loralab.data.datamodule import DomainDataModule
from loralab.evaluation.build import routed_model
from loralab.evaluation.shared_base import SharedBase
from loralab.evaluation.systems import GatePrior, row_routing
from loralab.routing.prior import gate_bias, slot_probs
from loralab.training.moelora_gate import GateTrainingModule
from moelora import GATE
from tests.conftest import compose

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
    cfg = compose("evaluate", ["experiment=smoke"], tmp_path_factory.mktemp("prior"))
    base, tok = load_base_model(cfg.base_model)
    shared = SharedBase(base, weights_fingerprint(base))
    adapters = {d: Path(p) for d, p in smoke_experts["adapters"].items()}
    dm = DomainDataModule(cfg.data, tok, EXPERTS)
    batch = next(iter(dm.eval_dataloader("val")))
    return cfg, shared, tok, adapters, batch


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


def test_prior_systems_are_named_in_config_and_use_the_right_gate_and_scale():
    from loralab.evaluation.build import check_names, gate_of, needs_router, routed_systems

    names = ["moelora", "moelora_prior", "moelora_prior_infer", "moelora_prior_nobias",
             "moelora_prior_s2", "moelora_prior_s0.5"]  # fmt: skip
    check_names(names, EXPERTS)
    with pytest.raises(ValueError, match="unknown system"):
        check_names(["moelora_prior_sx"], EXPERTS)
    assert [gate_of(n) for n in names] == ["moelora", "moelora_prior", "moelora",
                                           *["moelora_prior"] * 3]  # fmt: skip
    assert [needs_router(n) for n in names] == [False, True, True, False, True, True]

    from types import SimpleNamespace

    from loralab.data.records import Record
    from loralab.evaluation.build import RouterChoices

    probs = {"law": 0.7, "code": 0.1, "medical": 0.1, "base": 0.1}
    choices = RouterChoices.__new__(RouterChoices)  # its decisions, without loading a router
    choices.experts, choices.decisions = EXPERTS, {"r1": SimpleNamespace(probs=probs)}
    record = Record("r1", "law", "q", "a")
    systems = routed_systems(names, EXPERTS, choices, EXPERTS, prior=(1.0, 1e-4))
    p = slot_probs(probs, EXPERTS)
    for name, scale in (("moelora_prior", 1.0), ("moelora_prior_infer", 1.0),
                        ("moelora_prior_s2", 2.0), ("moelora_prior_s0.5", 0.5)):  # fmt: skip
        bias = systems[name].choose(record)
        assert isinstance(bias, GatePrior)
        np.testing.assert_allclose(bias.bias, scale * np.log(p), rtol=1e-6)
    assert systems["moelora_prior_nobias"].choose(record) is GATE
    with pytest.raises(ValueError, match="needs the router"):
        routed_systems(["moelora_prior"], EXPERTS, None)
