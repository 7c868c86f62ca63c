import json
from pathlib import Path

import pytest
import torch

from loralab.base_model import build_tiny_tokenizer
from loralab.data import DataFormatError, encode_pair, read_records, select_split, split_of
from loralab.data.batching import LengthGroupedSampler, collate_examples
from loralab.data.formatting import IGNORE_INDEX, prompt_text
from loralab.data.records import default_data_root, router_labels, spread_subset


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def _rec(i: int, domain: str = "law", **kw) -> str:
    obj = {"id": f"{domain}-{i}", "domain": domain, "instruction": f"q{i}", "response": f"a{i}"}
    obj.update(kw)
    return json.dumps(obj)


def test_read_records_valid(tmp_path):
    recs = read_records(
        _write(tmp_path / "law.jsonl", [_rec(0), "", _rec(1)]), expected_domain="law"
    )
    assert [r.id for r in recs] == ["law-0", "law-1"]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", r"law.jsonl:2: not valid JSON"),
        ('["a"]', r"law.jsonl:2: expected a JSON object"),
        (
            json.dumps({"id": "x", "domain": "law", "instruction": "q"}),
            r"law.jsonl:2: field 'response' is missing",
        ),
        (_rec(5, response=""), r"law.jsonl:2: field 'response' must be a non-empty string"),
        (_rec(5, instruction=3), r"law.jsonl:2: field 'instruction' must be a non-empty string"),
        (_rec(5, domain="code"), r"law.jsonl:2: field 'domain' is 'code', expected 'law'"),
        (_rec(0), r"law.jsonl:2: field 'id' 'law-0' repeats line 1"),
    ],
)
def test_corrupt_line_names_file_line_and_field(tmp_path, bad_line, message):
    path = _write(tmp_path / "law.jsonl", [_rec(0), bad_line, _rec(9)])
    with pytest.raises(DataFormatError, match=message):
        read_records(path, expected_domain="law")


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
        read_records(tmp_path / "nope.jsonl")


def test_split_is_deterministic_disjoint_and_sized():
    ids = [f"rec-{i}" for i in range(20000)]
    splits = [split_of(i, 0.05, 0.05) for i in ids]
    assert splits == [split_of(i, 0.05, 0.05) for i in ids]
    frac = {s: splits.count(s) / len(ids) for s in ("train", "val", "test")}
    assert abs(frac["test"] - 0.05) < 0.01 and abs(frac["val"] - 0.05) < 0.01
    with pytest.raises(ValueError, match="bad split fractions"):
        split_of("x", 0.6, 0.5)


def test_select_split_and_spread_subset(tmp_path):
    recs = read_records(_write(tmp_path / "law.jsonl", [_rec(i) for i in range(400)]))
    parts = {s: {r.id for r in select_split(recs, s, 0.1, 0.1)} for s in ("train", "val", "test")}
    assert parts["train"].isdisjoint(parts["test"]) and parts["val"].isdisjoint(parts["test"])
    assert sum(len(p) for p in parts.values()) == 400
    spread = spread_subset(recs, 4)
    assert [r.id for r in spread] == ["law-0", "law-100", "law-200", "law-300"]


def test_labels_mask_the_prompt():
    tok = build_tiny_tokenizer()
    ex = encode_pair(tok, "What is a tort?", "A civil wrong.", max_length=512, domain_id=2)
    n_prompt = len(tok(prompt_text(tok, "What is a tort?"), add_special_tokens=False)["input_ids"])
    assert ex.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
    assert tok.decode(ex.input_ids[n_prompt:]) == "A civil wrong.<|im_end|>"
    assert ex.domain_id == 2


def test_truncation_keeps_response_and_assistant_header():
    tok = build_tiny_tokenizer()
    ex = encode_pair(tok, "word " * 500, "short answer", max_length=64)
    assert len(ex) == 64
    answer = [t for t in ex.labels if t != IGNORE_INDEX]
    assert tok.decode(answer) == "short answer<|im_end|>"
    assert tok.decode(ex.input_ids[: len(ex) - len(answer)]).endswith("<|im_start|>assistant\n")
    long = encode_pair(tok, "q", "x " * 500, max_length=64)
    assert len(long) == 64 and sum(t != IGNORE_INDEX for t in long.labels) >= 32


def test_collate_pads_and_masks():
    tok = build_tiny_tokenizer()
    exs = [
        encode_pair(tok, "a", "b", 64, 0),
        encode_pair(tok, "longer question here", "answer", 64, 1),
    ]
    batch = collate_examples(exs, pad_token_id=tok.pad_token_id)
    width = max(len(e) for e in exs)
    assert batch["input_ids"].shape == (2, width)
    assert batch["attention_mask"].sum(1).tolist() == [len(e) for e in exs]
    assert (batch["labels"][0, len(exs[0]) :] == IGNORE_INDEX).all()
    assert batch["domain_id"].tolist() == [0, 1]


def test_length_grouped_sampler_is_a_permutation_with_similar_batches():
    lengths = torch.randint(5, 500, (400,), generator=torch.Generator().manual_seed(0)).tolist()
    sampler = LengthGroupedSampler(lengths, batch_size=8, buckets=10, seed=1)
    order = list(sampler)
    assert sorted(order) == list(range(400))
    batches = [order[i : i + 8] for i in range(0, 400, 8)]
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(
        batches
    )
    assert spread < 60  # random batches of 8 would spread ~390
    sampler.set_epoch(1)
    assert list(sampler) != order


@pytest.mark.skipif(not default_data_root().is_dir(), reason="shared data folder not present")
def test_real_files_validate():
    for domain in ("law", "code", "medical", "general"):  # conf/data/default.yaml's files
        recs = read_records(default_data_root() / f"{domain}.jsonl", expected_domain=domain)
        assert len(recs) > 1000


def test_router_labels_are_the_domains_then_base():
    assert router_labels(["law", "code", "finance"]) == ["law", "code", "finance", "base"]
    for bad in (["law", "base"], ["general"], ["law", "law"], []):
        with pytest.raises(ValueError, match=r"data\.domains"):
            router_labels(bad)
