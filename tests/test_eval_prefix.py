"""Option rows scored with each question's prompt forwarded once (KV cache shared by its options)
equal full-row scoring for every kind of routing and for PEFT systems with a cache; X-LoRA keeps
full rows; fewer prompt tokens are forwarded."""

from dataclasses import replace

import pytest
import torch

from loralab.base_model import load_base_model
from loralab.data.formatting import IGNORE_INDEX
from loralab.evaluation.benchmarks import ChoiceQuestion
from loralab.evaluation.build import peft_system, routed_model, routed_systems
from loralab.evaluation.options import build_choice_set
from loralab.evaluation.prefix import uses_kv_cache
from loralab.evaluation.scoring import RoutedScorer, score_model
from loralab.evaluation.systems import GatePrior, ModelSystem, RoutedSystem
from moelora.routing import GATE
from tests.conftest import smoke_eval_env

EXPERTS = ["law", "code", "medical"]
CPU = torch.device("cpu")
MAX_LENGTH = 96
BATCH = 5  # not a multiple of 3 options: questions split over batches by rows


@pytest.fixture(scope="module")
def env(smoke_experts, tmp_path_factory):
    e = smoke_eval_env(smoke_experts, tmp_path_factory.mktemp("prefix"))
    questions = [
        ChoiceQuestion(
            f"q{i}", "medical", f"Is claim {i} supported? " * (i % 3 + 1), choices, i % 2
        )
        for i, choices in enumerate(
            [("Yes", "No", "Maybe")] * 5 + [("affirmed", "reversed in part and remanded")] * 2
        )
    ]
    long = "The record shows a long history of the patient. " * 40 + "Is it benign?"
    questions.append(ChoiceQuestion("cut", "law", long, ("Yes", "No, it is malignant"), 1))
    choice_set = build_choice_set("mc", questions, e.tok, MAX_LENGTH)
    return e.cfg, e.shared, e.tok, e.adapters, choice_set


def _full(choice_set):
    return {"mc": replace(choice_set.rows, shared_prompts=False)}


def _assert_same(got, want):
    assert got["n_tokens"] == want["n_tokens"]
    assert got["nll_sum"] == pytest.approx(want["nll_sum"], rel=1e-5, abs=1e-5)


def test_the_cut_prompt_differs_per_option_and_is_cut(env):
    *_, choice_set = env
    rows = choice_set.rows
    cut = [e for e, r in zip(rows.examples, rows.records, strict=True) if r.id == "mc/cut"]
    assert [len(e) for e in cut] == [MAX_LENGTH, MAX_LENGTH]  # longer than max_length: cut
    assert all(len(e) < MAX_LENGTH for e in rows.examples if e not in cut)
    prompts = [e.input_ids[: e.labels.index(next(t for t in e.labels if t != -100))] for e in cut]
    assert prompts[0] != prompts[1]  # options of different lengths keep different middles


def test_every_routing_kind_equals_full_rows(env):
    _, shared, tok, adapters, choice_set = env
    pad = int(tok.pad_token_id)
    with routed_model(shared, adapters, None) as model:
        slots = len(model.gate_slot_names)
        _every_routing_kind(model, choice_set, pad, slots)


def _every_routing_kind(model, choice_set, pad, slots):
    bias = torch.linspace(-2.0, 1.0, slots)
    per_question = [
        None,
        "law",
        {"law": 0.3, "medical": 0.7},  # a mixture (router_soft)
        GATE,
        GatePrior(tuple(bias.tolist())),
        ("law", "medical"),  # best-of (the two-domain oracle)
        GATE,
        GatePrior(tuple(bias.flip(0).tolist())),
    ]
    by_id = {f"mc/{q.id}": c for q, c in zip(choice_set.questions, per_question, strict=True)}
    mixed = RoutedSystem("mixed", lambda r: by_id[r.id])
    systems = routed_systems(["base", "expert_code", "merge_cat", "moelora"], EXPERTS, None)
    prior = RoutedSystem("prior", lambda r: GatePrior(tuple((bias * 0.5).tolist())))
    shared_scorer = RoutedScorer(model, {"mc": choice_set.rows}, BATCH, pad, CPU)
    full_scorer = RoutedScorer(model, _full(choice_set), BATCH, pad, CPU)
    for system in [mixed, prior, *systems.values()]:
        _assert_same(shared_scorer.score(system)["mc"], full_scorer.score(system)["mc"])


def test_each_prompt_is_forwarded_once_per_choice(env):
    _, shared, tok, adapters, choice_set = env
    pad = int(tok.pad_token_id)
    base = routed_systems(["base"], EXPERTS, None)["base"]
    with routed_model(shared, adapters, None) as model:
        once = RoutedScorer(model, {"mc": choice_set.rows}, BATCH, pad, CPU)
        once.fill([base])
        full = RoutedScorer(model, _full(choice_set), BATCH, pad, CPU)
        full.fill([base])
    rows = choice_set.rows
    prompts, options = set(), 0
    for record, example in zip(rows.records, rows.examples, strict=True):
        first = next(k for k, t in enumerate(example.labels) if t != IGNORE_INDEX)
        prompts.add((record.id, tuple(example.input_ids[:first])))
        options += len(example) - first
    assert full.tokens == sum(len(e) for e in rows.examples)
    assert once.tokens == sum(len(p) for _, p in prompts) + options
    assert len(prompts) == len(choice_set.questions) + 1  # the cut question: two prompts
    assert once.tokens < 0.6 * full.tokens


def _score_both(system, base, choice_set, pad):
    """The option rows scored with shared prompts, then as full rows; and the input tokens (padding
    included) ``base`` forwarded for each."""
    counted = [0]

    def hook(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        counted[0] += ids.numel()

    handle = base.get_input_embeddings().register_forward_pre_hook(hook, with_kwargs=True)
    try:
        once = score_model(system, {"mc": choice_set.rows}, BATCH, pad, CPU)["mc"]
        tokens_once = counted[0]
        full = score_model(system, _full(choice_set), BATCH, pad, CPU)["mc"]
    finally:
        handle.remove()
    return once, full, tokens_once, counted[0] - tokens_once


@pytest.mark.parametrize("name", ["merge_ties", "arrow"])
def test_peft_systems_with_a_cache_equal_full_rows(env, name):
    cfg, shared, tok, adapters, choice_set = env
    pad = int(tok.pad_token_id)
    with peft_system(name, shared, cfg, adapters, None) as system:
        assert uses_kv_cache(system.model)
        once, full, tokens_once, tokens_full = _score_both(system, shared.model, choice_set, pad)
    _assert_same(once, full)
    assert tokens_once < 0.7 * tokens_full


def test_xlora_has_no_cache_and_keeps_full_rows(env):
    from loralab.baselines import build_xlora

    cfg, _, tok, adapters, choice_set = env
    pad = int(tok.pad_token_id)
    base, _ = load_base_model(cfg.base_model)
    model = build_xlora(base, adapters).eval()
    assert not uses_kv_cache(model)
    once, full, tokens_once, tokens_full = _score_both(
        ModelSystem("xlora", model), base, choice_set, pad
    )
    assert once == full  # the same full-row forwards
    assert tokens_once == tokens_full
