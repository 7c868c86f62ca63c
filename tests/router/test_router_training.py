"""``train_router`` end to end: tiny synthetic data with the hashing encoder, and (slow) the real
MiniLM on a few real records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests_router_helpers import VOCAB

from loralab.routing.datasets import (
    last_paragraph,
    out_of_style_examples,
    read_label_records,
    record_views,
    source_group,
    split_examples,
)
from router import Reason, Router
from tests.conftest import compose

FILES = {
    "law": "law.jsonl",
    "code": "code.jsonl",
    "medical": "medical.jsonl",
    "general": "general.jsonl",
}
# The shared toy vocabulary's first ten words per label ("general" data is the "base" label).
WORDS = {d: VOCAB["base" if d == "general" else d][:10] for d in FILES}


def _write_data(root: Path, n: int = 80) -> None:
    (root / "eval").mkdir(parents=True)
    for domain, words in WORDS.items():
        rows = []
        for i in range(n):
            text = " ".join(words[(i + j) % len(words)] for j in range(5 + i % 4))
            source = (
                "HazyResearch/legalbench@x:tasks/hearsay/test.tsv"
                if domain == "law" and i % 10 == 0
                else "src:x"
            )
            rows.append(
                {
                    "id": f"{domain}-{i}",
                    "domain": domain,
                    "instruction": f"Item {i}.\n\n{text}",
                    "response": f"{text} answer " * 10,
                    "source": source,
                    "license": "MIT",
                }
            )
        (root / FILES[domain]).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    humaneval = {
        "id": "he-0",
        "domain": "code",
        "instruction": "def f(array): python loop",
        "response": "x",
    }
    (root / "eval" / "humaneval.jsonl").write_text(json.dumps(humaneval) + "\n")


def test_views_and_groups() -> None:
    from loralab.data.records import Record

    r = Record(
        "i",
        "law",
        "Rule text.\n\nQ: Did the trial court err here?",
        "Yes",
        "HazyResearch/legalbench@e:tasks/hearsay/t.tsv",
    )
    assert source_group(r) == "legalbench/hearsay"
    assert last_paragraph(r.instruction) == "Did the trial court err here?"
    assert last_paragraph("one paragraph only") is None
    assert record_views(r, ["instruction", "last_paragraph", "response"], 80) == [
        ("instruction", r.instruction),
        ("last_paragraph", "Did the trial court err here?"),
    ]
    with pytest.raises(ValueError, match="unknown training view"):
        record_views(r, ["title"], 80)


def test_heldout_groups_never_reach_any_split_and_form_the_check_set(tmp_path: Path) -> None:
    _write_data(tmp_path)
    records = read_label_records(tmp_path, FILES)
    held = ["legalbench/hearsay"]
    seen = set()
    for split in ("train", "val", "test"):
        examples = split_examples(records, split, 0.2, 0.2, None, exclude_groups=held)
        assert all(e.group != "legalbench/hearsay" for e in examples)
        ids = {e.text for e in examples}
        assert not (ids & seen)  # splits are disjoint
        seen |= ids
    check = out_of_style_examples(tmp_path, records, held)
    assert {(e.label, e.group) for e in check} == {
        ("law", "legalbench/hearsay"),
        ("code", "humaneval"),
    }
    assert len([e for e in check if e.group == "legalbench/hearsay"]) == 8


def test_train_router_with_the_hashing_encoder(tmp_path: Path) -> None:
    from loralab.routing import train_router

    _write_data(tmp_path / "data")
    cfg = compose(
        "train_router",
        [
            f"data.root={tmp_path / 'data'}",
            "data.val_fraction=0.2",
            "data.test_fraction=0.2",
            "router.encoder.kind=hashing",
            "router.encoder.name=hashing",
            "router.encoder.quantize=null",
            "router.data.max_train_per_label=40",
            "router.head.c=10",
            "router.ood_prototypes_per_label=4",
            "router.latency_requests=10",
            "router.data.heldout_groups=[legalbench/hearsay]",
        ],
        tmp_path / "run",
    )
    result = train_router(cfg)
    run = tmp_path / "run"
    metrics = json.loads((run / "router_metrics.json").read_text())
    assert result["model_version"] == metrics["model_version"]
    assert metrics["sets"]["test"]["accuracy"] >= 0.9
    assert set(metrics["sets"]) == {"test", "out_of_style", "probe", "exam_dev", "exam_sealed"}
    exam = metrics["sets"]["exam_dev"]
    assert (
        exam["n"] == 118 and sum(exam["per_label"][k]["support"] for k in exam["per_label"]) == 118
    )
    for k in ("ece", "coverage", "expert_risk", "confident_errors", "caught_errors"):
        assert 0.0 <= exam[k] <= 1.0
    # generated views were made from the toy records and trained on
    assert metrics["router"]["n_train"] > 4 * 40 * 2
    assert set(metrics["baselines"]["test"]) == {
        "logreg_plain",
        "nearest_centroid",
        "zero_shot_descriptions",
    }
    assert metrics["sets"]["out_of_style"]["per_group_accuracy"]["legalbench/hearsay"]["n"] == 8
    assert len(metrics["sets"]["test"]["confusion_matrix"]) == 4
    assert metrics["latency"]["p50_ms"] > 0 and metrics["latency"]["batch_rps"] > 0
    assert (
        (run / "tables" / "test_confusion_matrix.csv")
        .read_text()
        .startswith("true \\ predicted,law")
    )
    assert (run / "summary.json").is_file() and (run / "metrics.jsonl").is_file()
    router = Router.load(run / "router")
    d = router.route("patient symptoms fever diagnosis treatment dose")
    assert (d.label, d.reason) == ("medical", Reason.CONFIDENT), d
    # a second run reuses the cached embeddings
    assert list((run / "cache" / "router_embeddings").glob("*.npy"))


@pytest.mark.slow
def test_train_router_with_real_minilm_and_real_data(tmp_path: Path) -> None:
    from loralab.data.records import default_data_root
    from loralab.routing import train_router

    if not (default_data_root() / "law.jsonl").is_file():
        pytest.skip("the shared data folder is not available")
    cfg = compose(
        "train_router",
        [
            "router.data.max_train_per_label=24",
            "router.data.max_val_per_label=8",
            "router.data.max_test_per_label=8",
            "router.data.max_check_per_group=1",
            "router.data.probe_set=false",
            "router.data.views=[instruction]",
            "router.latency_requests=3",
            "router.ood_prototypes_per_label=4",
            "logger=none",
        ],
        tmp_path,
    )
    result = train_router(cfg)
    assert result["metrics"]["sets"]["test"]["accuracy"] >= 0.8
    router = Router.load(tmp_path / "router")
    decisions = router.route_batch(
        [
            "Write a Python function that returns the n-th Fibonacci number.",
            "What are the symptoms of iron deficiency anemia?",
            "Does the clause grant the licensee an exclusive license to the patents?",
        ]
    )
    assert [d.predicted for d in decisions] == ["code", "medical", "law"]
    # the real tokenizer and model from many threads give what a loop gives
    from concurrent.futures import ThreadPoolExecutor

    texts = [
        f"{q} ({i})"
        for i in range(4)
        for q in ("What is a tort?", "Define sepsis.", "Sort a list in Go.")
    ]
    with ThreadPoolExecutor(max_workers=4) as pool:
        threaded = [d.probs for d in pool.map(router.route, texts)]
    assert threaded == [router.route(t).probs for t in texts]
