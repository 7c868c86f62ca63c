"""Task accuracy: option-likelihood scoring (routed and PEFT paths), benchmark and extra-set
loading with file:line errors, HumanEval's check mode in the sandbox, pass@1 and paired tests."""

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from loralab.base_model import load_base_model, weights_fingerprint
from loralab.data.records import DataFormatError, data_root, read_records
from loralab.evaluation.benchmarks import (
    ChoiceQuestion,
    choice_sets,
    extra_sets,
    first_word_questions,
    label_set_questions,
    read_choice_file,
)
from loralab.evaluation.build import routed_model, routed_systems
from loralab.evaluation.generation import extract_code, generation_metrics, humaneval_items
from loralab.evaluation.options import (
    build_choice_set,
    encode_option,
    paired_rate_tests,
    pick_options,
)
from loralab.evaluation.sandbox import run_checks
from loralab.evaluation.scoring import RoutedScorer, score_model
from loralab.evaluation.shared_base import SharedBase
from loralab.evaluation.systems import ModelSystem
from tests.conftest import compose

EXPERTS = ["law", "code", "medical"]
CPU = torch.device("cpu")
HELDOUT = ["legalbench/hearsay", "legalbench/ucc_v_common_law", "legalbench/successor_liability"]


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return compose("evaluate", ["experiment=smoke"], tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module")
def tokenizer(cfg):
    return load_base_model(cfg.base_model)[1]


def _questions(n: int = 6) -> list[ChoiceQuestion]:
    choices = ("Yes", "No", "Maybe")
    return [
        ChoiceQuestion(f"q{i}", "medical", f"Is claim {i} supported? " * (i + 1), choices, i % 3)
        for i in range(n)
    ]


def _prefer(model, token_id: int, boost: float = 50.0):
    """Make ``model`` (its output embedding) strongly prefer ``token_id`` at every position."""

    def hook(_module, _inputs, logits):
        logits = logits.clone()
        logits[..., token_id] += boost
        return logits

    return model.get_output_embeddings().register_forward_hook(hook)


def test_a_model_forced_to_prefer_an_option_picks_it(cfg, tokenizer):
    base, _ = load_base_model(cfg.base_model)
    questions = _questions()
    cs = build_choice_set("mc", questions, tokenizer, 128, eos=False)
    no = tokenizer("No", add_special_tokens=False)["input_ids"]
    assert len(no) == 1  # the boosted token is the whole option "No"
    handle = _prefer(base, no[0])
    try:
        scored = score_model(ModelSystem("forced", base), {"mc": cs.rows}, 4, 0, CPU)["mc"]
    finally:
        handle.remove()
    outcome = pick_options(cs, scored)
    assert outcome["pred"] == [1] * len(questions)  # "No" (option 1) every time
    assert outcome["pred_norm"] == [1] * len(questions)
    assert outcome["correct"] == [int(q.answer == 1) for q in questions]


def test_option_rows_score_only_the_option_and_share_the_question(cfg, tokenizer):
    questions = _questions(2)
    cs = build_choice_set("mc", questions, tokenizer, 128, eos=True)
    assert len(cs.rows.records) == 6 and cs.question_of == [0, 0, 0, 1, 1, 1]
    assert {r.id for r in cs.rows.records[:3]} == {"mc/q0"}  # one routing decision per question
    for row, option in zip(cs.rows.examples[:3], questions[0].choices, strict=True):
        scored = [t for t in row.labels if t != -100]
        want = tokenizer(option + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        assert scored == want and row.input_ids[-len(want) :] == want


def test_a_long_prompt_keeps_its_start_and_its_question(tokenizer):
    prompt = "word " * 400 + "QUESTION: is it so?"
    row = encode_option(tokenizer, prompt, "Maybe", 100, eos=False)
    assert len(row.input_ids) == 100
    text = tokenizer.decode(row.input_ids)
    assert "QUESTION: is it so?" in text and text.rstrip().endswith("Maybe")
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    assert text.startswith(tokenizer.decode(tokenizer(full)["input_ids"][:10]))


def test_routed_option_scores_equal_the_plain_model_per_question_choice(
    cfg, tokenizer, smoke_experts
):
    base, _ = load_base_model(cfg.base_model)
    shared = SharedBase(base, weights_fingerprint(base))
    adapters = {d: Path(p) for d, p in smoke_experts["adapters"].items()}
    cs = build_choice_set("mc", _questions(), tokenizer, 128)
    pad = int(tokenizer.pad_token_id)
    plain = score_model(ModelSystem("base", base), {"mc": cs.rows}, 4, pad, CPU)["mc"]
    systems = routed_systems(["base", "oracle"], EXPERTS, None)
    with routed_model(shared, adapters, None) as model:
        scorer = RoutedScorer(model, {"mc": cs.rows}, 4, pad, CPU)
        routed = scorer.score(systems["base"])["mc"]
        oracle = scorer.score(systems["oracle"])["mc"]
        medical = RoutedScorer(model, {"mc": cs.rows}, 4, pad, CPU)
        medical_system = routed_systems(["expert_medical"], EXPERTS, None)["expert_medical"]
        expert = medical.score(medical_system)["mc"]
    assert routed["nll_sum"] == pytest.approx(plain["nll_sum"], rel=1e-5, abs=1e-4)
    # the questions are medical: the oracle's one choice per question is the medical expert
    assert oracle["nll_sum"] == expert["nll_sum"]
    assert expert["nll_sum"] != pytest.approx(plain["nll_sum"], rel=1e-6)


def test_pubmedqa_answers_come_from_the_first_word(cfg):
    path = data_root(cfg.data) / "eval" / "pubmedqa_pqal_test500.jsonl"
    questions = first_word_questions(path, "medical", ["Yes", "No", "Maybe"], "pubmedqa")
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    expected = Counter(r["response"].split(".")[0] for r in raw)
    got = Counter(q.choices[q.answer] for q in questions)
    assert got == expected and len(questions) == len(raw)
    with pytest.raises(DataFormatError, match="field 'response' starts with 'Yes'"):
        first_word_questions(path, "medical", ["yes", "no"], "pubmedqa")
    with pytest.raises(ValueError, match="must be strings"):
        first_word_questions(path, "medical", [True, False, "Maybe"], "pubmedqa")


def test_label_sets_are_each_tasks_distinct_gold_responses(cfg):
    from loralab.data.records import domain_file

    records = read_records(domain_file(cfg.data, "law"))
    excluded = {r.id for r in records if "hearsay" in r.source}  # e.g. what an expert trained on
    keep = excluded.pop()  # all but one hearsay record excluded
    questions = label_set_questions(records, HELDOUT, excluded)
    assert [q.id for q in questions if q.group == "legalbench/hearsay"] == [keep]
    for group in HELDOUT[1:]:
        task = group.split("/")[1]
        gold = {r.response.strip() for r in records if f"/{task}/" in r.source}
        in_set = [q for q in questions if q.group == group]
        assert len(in_set) == sum(f"/{task}/" in r.source for r in records)
        assert all(set(q.choices) == gold and q.choices[q.answer] in gold for q in in_set)
    with pytest.raises(ValueError, match="no records for group"):
        label_set_questions(records, ["legalbench/no_such_task"], set())


GOOD = {"id": "1", "domain": "law", "question": "Q?", "choices": ["A", "B"], "answer": "B"}


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("{not json", r":2: not valid JSON"),
        ('["a list"]', r":2: expected a JSON object"),
        (json.dumps({**GOOD, "id": "2", "choices": None}), r":2: field 'choices' must be a list"),
        (json.dumps({**GOOD, "id": "2", "choices": ["A"]}), r":2: field 'choices' must be a list"),
        (json.dumps({**GOOD, "id": "2", "choices": ["A", "A"]}), r":2: field 'choices'"),
        (json.dumps({**GOOD, "id": "2", "answer": "C"}), r":2: field 'answer' must be one of"),
        (json.dumps({**GOOD, "id": "2", "answer": 2}), r":2: field 'answer' must be one of"),
        (json.dumps({**GOOD, "id": "2", "answer": True}), r":2: field 'answer'"),
        (json.dumps({**GOOD, "question": "  "}), r":2: field 'question' must be a non-empty"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "domain"}), r":2: field 'domain' is"),
        (json.dumps(GOOD), r":2: field 'id' '1' repeats line 1"),
    ],
)
def test_bad_extra_choice_lines_name_file_line_and_field(tmp_path, line, match):
    path = tmp_path / "bench.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + line + "\n")
    with pytest.raises(DataFormatError, match=f"bench.jsonl{match}"):
        read_choice_file(path)


def test_extra_sets_read_choice_and_nll_files(cfg, tmp_path):
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "id": "2", "answer": 0}) + "\n")
    nll = tmp_path / "nll.jsonl"
    nll.write_text(json.dumps({"id": "a", "domain": "law", "instruction": "i", "response": "r"}))
    specs = [{"name": "mine", "path": str(mc), "eos": True}, {"name": "long", "path": str(nll)}]
    choice, scored = extra_sets(cfg.data, specs, ["law"])
    ((questions, eos),) = choice.values()
    assert [q.answer for q in questions] == [1, 0] and eos is True
    assert [r.id for r in scored["long"]] == ["long/a"]  # no clash with other sets' ids
    with pytest.raises(ValueError, match=r"extra_sets\[0\]: name 'law' is already a set"):
        extra_sets(cfg.data, [{"name": "law", "path": str(mc)}], ["law"])
    with pytest.raises(FileNotFoundError, match=r"extra_sets\[0\] \(x\): file not found"):
        extra_sets(cfg.data, [{"name": "x", "path": str(tmp_path / "none.jsonl")}], [])
    with pytest.raises(DataFormatError, match=r"nll.jsonl:1: field 'response' is missing"):
        nll.write_text(json.dumps({"id": "a", "domain": "law", "instruction": "i"}))
        extra_sets(cfg.data, [{"name": "long", "path": str(nll), "kind": "nll"}], [])


def test_choice_sets_from_config_are_capped_and_spread(cfg):
    found = choice_sets(
        cfg.data, {**cfg.eval, "choice_sets": {**cfg.eval.choice_sets, "max_per_set": 5}}, HELDOUT
    )
    assert set(found) == {"pubmedqa", "legalbench_heldout"}
    assert all(len(questions) == 5 for questions, _ in found.values())
    groups = {q.group for q in found["legalbench_heldout"][0]}
    assert len(groups) > 1  # spread over the tasks, not the first one's head


def test_humaneval_check_mode_in_the_sandbox(cfg):
    items = humaneval_items(cfg.data, "eval/humaneval.jsonl", 3)
    assert len(items) == 3
    for item in items:
        body = item.record.response  # the canonical solution's body
        header = item.record.instruction
        fenced = f"Here it is:\n```python\n{header}{body}```\n"
        for reply in (body, fenced):  # a completion, or the whole function in a code block
            code = extract_code(reply)
            assert run_checks(code, item.tests, item.setup, 10, item.entry_point), item.record.id
        wrong = f"def {item.entry_point}(*args, **kwargs):\n    return None\n"
        assert not run_checks(wrong, item.tests, item.setup, 10, item.entry_point)


def test_pass_at_1_and_paired_tests_on_outcomes():
    replies = {
        "humaneval": [
            {"id": str(i), "reply": "", "score": float(p), "passed": p}
            for i, p in enumerate([True, False, True, True])
        ],
        "gen_law": [{"id": "x", "reply": "", "score": 0.25}],
    }
    metrics = {m["set"]: m for m in generation_metrics("s", replies, (200, 0, 0.05))}
    assert metrics["humaneval"]["metric"] == "pass_rate"
    assert metrics["humaneval"]["value"] == pytest.approx(0.75)
    assert 0.0 <= metrics["humaneval"]["ci_low"] <= 0.75 <= metrics["humaneval"]["ci_high"] <= 1
    assert (metrics["gen_law"]["metric"], metrics["gen_law"]["ci_low"]) == ("rougeL", None)
    rates = {"a": {"t": [1, 1, 1, 0]}, "b": {"t": [0, 0, 0, 0]}}
    test = paired_rate_tests(rates, "a", "b", 1000, 0, 0.05)["t"]
    assert test["diff"] == pytest.approx(0.75)
    # exact permutation test: |diff| >= 0.75 only when the 3 differing pairs all keep or all swap
    assert test["p_value"] == pytest.approx(2 / 8)


def test_a_set_of_one_question_gets_no_p_value():
    test = paired_rate_tests({"a": {"t": [1]}, "b": {"t": [0]}}, "a", "b", 100, 0, 0.05)["t"]
    assert test["diff"] == 1.0 and test["p_value"] != test["p_value"]  # nan: no test
