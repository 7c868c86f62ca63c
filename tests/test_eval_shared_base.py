"""One base model for the whole evaluation: every system's teardown leaves it exactly as loaded."""

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from loralab.base_model import load_base_model, weights_fingerprint
from loralab.evaluation.build import peft_system, routed_model
from loralab.evaluation.shared_base import BaseModelChanged, SharedBase
from tests.conftest import compose


@pytest.fixture(scope="module")
def env(smoke_experts, tmp_path_factory):
    cfg = compose("evaluate", ["experiment=smoke"], tmp_path_factory.mktemp("eval"))
    base, tok = load_base_model(cfg.base_model)
    ids = torch.tensor([tok("The court held that the patient's code compiles.")["input_ids"]])
    adapters = {d: Path(p) for d, p in smoke_experts["adapters"].items()}
    return cfg, base, ids, adapters


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_every_system_group_leaves_the_base_as_loaded(env, smoke_experts):
    from loralab.baselines import build_xlora
    from loralab.training.xlora import save_xlora_classifier

    cfg, base, ids, adapters = env
    shared = SharedBase(base, weights_fingerprint(base))
    modules = dict(base.named_modules())
    before = _logits(base, ids)
    xlora_dir = Path(cfg.paths.output_dir) / "xlora"
    xlora_dir.mkdir(parents=True)
    donor, _ = load_base_model(cfg.base_model)
    save_xlora_classifier(build_xlora(donor, adapters), xlora_dir, adapters, shared.fingerprint, {})
    with routed_model(shared, adapters, None) as model:
        assert not torch.equal(_logits(model, ids), before)  # the gate mixes the experts
    for name in ("merge_ties", "xlora", "arrow"):
        with peft_system(name, shared, cfg, adapters, xlora_dir) as system:
            assert not torch.equal(_logits(system.model, ids), before), name
        assert base.config.use_cache is True, name  # X-LoRA turns it off; restored
        assert dict(base.named_modules()).keys() == modules.keys()
        assert all(m is modules[n] for n, m in base.named_modules()), name
        assert torch.equal(_logits(base, ids), before), name


def test_a_wrapper_that_does_not_unload_is_undone(env, caplog):
    _, base, ids, _ = env
    shared = SharedBase(base, weights_fingerprint(base))
    original = base.model.layers[0].mlp.up_proj
    before = _logits(base, ids)
    with caplog.at_level(logging.INFO), shared.lend("leaky") as lent:
        lent.model.layers[0].mlp.up_proj = nn.Sequential(original, nn.ReLU())
        lent.config.use_cache = False
        lent.leftover = True
    assert base.model.layers[0].mlp.up_proj is original
    assert base.config.use_cache is True and not hasattr(base, "leftover")
    assert torch.equal(_logits(base, ids), before)
    assert "leaky: restored" in caplog.text


def test_a_changed_or_replaced_weight_is_refused(env):
    _, base, _, _ = env
    shared = SharedBase(base, weights_fingerprint(base))
    weight = base.model.layers[0].mlp.up_proj.weight
    saved = weight.detach().clone()
    with (
        pytest.raises(BaseModelChanged, match="fingerprint"),
        shared.lend("in place"),
        torch.no_grad(),
    ):
        weight.mul_(2.0)
    with torch.no_grad():
        weight.copy_(saved)
    layer = base.model.layers[0].mlp.up_proj
    with pytest.raises(BaseModelChanged, match="was replaced"), shared.lend("replaced"):
        layer.weight = nn.Parameter(saved.clone())
    layer.weight = weight
    shared.check("restored by hand")
