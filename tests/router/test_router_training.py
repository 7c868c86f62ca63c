"""``train_router`` end to end: tiny synthetic data with the hashing encoder, and (slow) the real
MiniLM on a few real records."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from omegaconf import DictConfig
from tests_router_helpers import VOCAB

from loralab.routing.datasets import (
    last_paragraph,
    out_of_style_examples,
    read_label_records,
    record_views,
    source_group,
    split_examples,
)
from router import EncoderSpec, HashingEncoder, Reason, Router
from router.encoders import ConcatEncoder, WordLlamaEncoder
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


class CountingEncoder(HashingEncoder):
    """The hashing encoder, recording every text it is asked to encode."""

    def __init__(self, spec: EncoderSpec | None = None) -> None:
        super().__init__(spec)
        self.texts: list[str] = []

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        self.texts += list(texts)
        return super().encode(texts, batch_size)


def _config(tmp_path: Path, *overrides: str) -> DictConfig:
    return compose(
        "train_router",
        [
            f"data.root={tmp_path / 'data'}",
            "data.val_fraction=0.2",
            "data.test_fraction=0.2",
            "router.encoder.kind=hashing",
            "router.encoder.name=hashing",
            "router.encoder.quantize=null",
            "router.encoder.static=null",
            "router.data.max_train_per_label=40",
            "router.head.c=10",
            "router.ood_prototypes_per_label=4",
            "router.latency_requests=10",
            "router.data.heldout_groups=[legalbench/hearsay]",
            *overrides,
        ],
        tmp_path / "run",
    )


def _train(cfg: DictConfig, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, Any], list[str]]:
    """``train_router(cfg)`` and every text its encoder encoded."""
    from loralab.routing import train as train_module

    built: list[CountingEncoder] = []

    def build(spec: dict[str, Any]) -> CountingEncoder:
        built.append(CountingEncoder(EncoderSpec.from_dict(spec)))
        return built[-1]

    monkeypatch.setattr(train_module, "build_encoder", build)
    result = train_module.train_router(cfg)
    assert len(built) == 1
    return result, built[0].texts


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


# With OOD prototypes the exam-style sets (outside the toy vocabulary) go to base as out of
# distribution; without them the classifier sends many to a wrong expert.
@pytest.mark.parametrize("prototypes", [4, 0])
def test_train_router_with_the_hashing_encoder(tmp_path: Path, prototypes: int) -> None:
    from loralab.routing import train_router
    from loralab.routing.train import build_examples

    _write_data(tmp_path / "data")
    # the gate reads the prototypes, and the style shift acts where the gate is not open
    no_gate = [] if prototypes else ["router.head_gate=null", "router.style_shift.checks=[]"]
    cfg = _config(tmp_path, f"router.ood_prototypes_per_label={prototypes}", *no_gate)
    result = train_router(cfg)
    run = tmp_path / "run"
    metrics = json.loads((run / "router_metrics.json").read_text())
    assert result["model_version"] == metrics["model_version"]
    assert metrics["sets"]["test"]["accuracy"] >= 0.9
    assert set(metrics["sets"]) == {
        "test",
        "out_of_style",
        "probe",
        *(
            f"{check}_{half}"
            for check in ("exam", *(f"exam{k}" for k in range(2, 20)))
            for half in ("dev", "sealed")
        ),
    }
    assert metrics["sets"]["exam2_sealed"]["n"] == metrics["sets"]["exam4_dev"]["n"] == 240
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
    assert (
        json.loads((run / "summary.json").read_text())["model_version"] == result["model_version"]
    )
    router = Router.load(run / "router")
    d = router.route("patient symptoms fever diagnosis treatment dose")
    assert (d.label, d.reason) == ("medical", Reason.CONFIDENT), d

    # Every evaluated set's selective metrics, counted by hand from the saved router's decisions
    sets = build_examples(cfg, tmp_path / "data")[2]
    assert set(sets) == set(metrics["sets"]) and len(sets["exam_dev"]) == 118
    exam_support = metrics["sets"]["exam_dev"]["per_label"].values()
    assert metrics["sets"]["exam_dev"]["n"] == sum(v["support"] for v in exam_support) == 118
    by_hand = {
        name: _selective_by_hand(router, [e.text for e in ex], [e.label for e in ex])
        for name, ex in sets.items()
    }
    for name, expected in by_hand.items():
        got = metrics["sets"][name]
        assert {k: got[k] for k in expected} == pytest.approx(expected), name
    exam = by_hand["exam_dev"]
    if prototypes:  # what abstention buys: every classifier error on the exam kept from an expert
        assert (exam["coverage"], exam["caught_errors"]) == (0.0, 1.0)
    else:
        assert exam["coverage"] > 0.5 and exam["expert_risk"] > 0.5 and exam["caught_errors"] == 0
    assert by_hand["test"]["accuracy"] >= 0.9 and 0 < by_hand["test"]["coverage"] < 1


def test_style_shift_is_fitted_on_the_named_checks_and_reported(tmp_path: Path) -> None:
    from loralab.routing import train_router
    from loralab.routing.exam_check import exam_items

    _write_data(tmp_path / "data")
    no_checks = ["router.data.exam_checks={}", "router.data.probe_set=false"]
    cfg = _config(
        tmp_path,
        *no_checks,
        "router.style_shift.checks=[exam2,exam3]",
        "router.style_shift.train_labels=[law,code,medical,base]",
        "router.style_shift.neighbours=5",
        "router.style_shift.embedding_l2=2e-5",
    )
    metrics = train_router(cfg)["metrics"]
    shift = metrics["router"]["style_shift"]
    assert shift["checks"] == ["exam2", "exam3"] and shift["n_questions"] == 960
    assert shift["train_labels"] == ["law", "code", "medical", "base"]
    assert shift["n_training_texts"] > 0
    per_label = shift["n_training_texts_per_label"]
    assert set(per_label) == {"law", "code", "medical", "base"}
    assert sum(per_label.values()) == shift["n_training_texts"]
    assert (shift["embedding_l2"], shift["train_weight"]) == (2e-5, 250.0)
    router = Router.load(tmp_path / "run" / "router")
    assert router.style_shift is not None
    assert router.style_shift.bias.tolist() == pytest.approx(shift["bias"])
    # the linear term reads the head's whole embedding
    weight = router.style_shift.embedding_weight
    assert weight is not None and weight.shape == (4, router.encoder.dim)
    # the neighbours that vote are the named checks' questions, with their labels
    assert shift["neighbours"] == {"k": 5, "temperature": 0.05}
    nb = router.style_shift.neighbours
    assert nb is not None and nb.embeddings.shape == (960, router.encoder.dim)
    gold = [
        i.label for c in ("exam2", "exam3") for h in ("dev", "sealed") for i in exam_items(h, c)
    ]
    assert sorted(router.labels[j] for j in nb.label_index) == sorted(gold)
    assert np.asarray(shift["vote_weight"]).shape == (4, 4)
    # the shift moves the exam questions' logits; a run without it saves no shift
    x = router.encoder.encode([i.text for i in exam_items(check="exam2")[:20]])
    _write_data(tmp_path / "plain" / "data")
    unshifted = _config(tmp_path / "plain", *no_checks, "router.style_shift.checks=[]")
    assert train_router(unshifted)["metrics"]["router"]["style_shift"] is None
    plain = Router.load(tmp_path / "plain" / "run" / "router")
    assert plain.style_shift is None
    assert not np.allclose(router.logits(x), plain.logits(x))
    _write_data(tmp_path / "bad" / "data")
    with pytest.raises(ValueError, match="unknown exam check 'exam20'"):
        train_router(_config(tmp_path / "bad", *no_checks, "router.style_shift.checks=[exam20]"))
    # without the head gate there is nothing for it to act on: refused with the override to add
    with pytest.raises(ValueError, match=r"needs the head gate .* router.style_shift.checks=\[\]"):
        train_router(_config(tmp_path / "bad", *no_checks, "router.head_gate=null"))


def test_stratum_weights_reweight_the_shift_and_need_reference_decisions(tmp_path: Path) -> None:
    from loralab.routing import train_router

    no_checks = ["router.data.exam_checks={}", "router.data.probe_set=false"]
    shifts = {}
    for weighted in (False, True):
        run = tmp_path / str(weighted)
        _write_data(run / "data")
        cfg = _config(
            run,
            *no_checks,
            "router.style_shift.checks=[exam2,exam3]",
            f"router.style_shift.stratum_weights={str(weighted).lower()}",
        )
        shift = train_router(cfg)["metrics"]["router"]["style_shift"]
        assert shift["stratum_weights"] is weighted
        shifts[weighted] = np.array(shift["bias"])
    assert not np.allclose(shifts[True], shifts[False])
    # the first check was written before the reference design routed any: it has no decisions
    _write_data(tmp_path / "bad" / "data")
    bad = _config(
        tmp_path / "bad",
        *no_checks,
        "router.style_shift.checks=[exam,exam2]",
        "router.style_shift.stratum_weights=true",
    )
    with pytest.raises(ValueError, match="exam check 'exam' has no reference decisions"):
        train_router(bad)


def _selective_by_hand(router: Router, texts: list[str], labels: list[str]) -> dict[str, float]:
    """Accuracy, coverage, risk and calibration of ``router`` on ``texts``, counted by hand."""
    decisions = router.decide_embeddings(router.encoder.encode(texts))
    y = np.array([router.labels.index(label) for label in labels])
    final = np.array([router.labels.index(d.label) for d in decisions])
    predicted = np.array([router.labels.index(d.predicted) for d in decisions])
    abstained = np.array([d.reason is not Reason.CONFIDENT for d in decisions])
    to_expert = final != router.labels.index("base")
    wrong = predicted != y
    conf = np.array([max(d.probs.values()) for d in decisions])
    bins = np.minimum((conf * 15).astype(int), 14)  # 15 equal-width confidence bins
    ece = sum(
        abs(np.mean(~wrong[bins == b]) - conf[bins == b].mean()) * np.mean(bins == b)
        for b in set(bins.tolist())
    )
    return {
        "accuracy": float(np.mean(final == y)),
        "accuracy_before_abstention": float(np.mean(~wrong)),
        "coverage": float(np.mean(to_expert)),
        "expert_risk": float(np.mean(final[to_expert] != y[to_expert])) if to_expert.any() else 0.0,
        "confident_errors": float(np.sum((final != y) & ~abstained) / len(y)),
        "caught_errors": float(np.sum(wrong & abstained) / max(1, wrong.sum())),
        "ece": float(ece),
    }


def test_cached_encode_reuses_a_chunk_and_reencodes_only_a_changed_one(tmp_path: Path) -> None:
    from loralab.routing.embedding_cache import cached_encode

    law, code = ["court statute", "tenant lease"], ["python loop", "sort array"]
    enc = CountingEncoder()
    x_law, x_code = cached_encode(enc, law, tmp_path, 8), cached_encode(enc, code, tmp_path, 8)
    assert enc.texts == law + code
    enc.texts.clear()
    again = cached_encode(enc, law, tmp_path, 8), cached_encode(enc, code, tmp_path, 8)
    assert enc.texts == []  # nothing encoded: both chunks come from the cache ...
    assert np.array_equal(again[0], x_law) and np.array_equal(again[1], x_code)  # ... unchanged
    assert np.array_equal(x_law, HashingEncoder().encode(law))
    changed = ["court statute", "tenant leases"]
    x = cached_encode(enc, changed, tmp_path, 8)
    assert enc.texts == changed  # its own chunk (one file per chunk), not the code chunk
    assert np.array_equal(x, HashingEncoder().encode(changed))
    # another encoder (same dim, other settings) never reads this encoder's embeddings
    other = CountingEncoder(EncoderSpec(kind="hashing", name="hashing", max_seq_length=1))
    assert np.array_equal(cached_encode(other, law, tmp_path, 8), other.encode(law))
    assert other.texts == law + law  # encoded by cached_encode, then by the check above
    # a damaged cache file is encoded again, never trusted
    for f in tmp_path.glob("*.npy"):
        f.write_bytes(b"not a numpy file")
    enc.texts.clear()
    assert np.array_equal(cached_encode(enc, law, tmp_path, 8), x_law) and enc.texts == law


def test_a_concatenated_encoder_caches_each_part_apart(tmp_path: Path) -> None:
    from loralab.routing.embedding_cache import cached_encode

    texts = ["court statute", "python loop", "patient fever"]
    x_sentence = cached_encode(CountingEncoder(), texts, tmp_path, 8)
    spec = EncoderSpec(kind="hashing", name="hashing", static="wordllama")
    both = ConcatEncoder(CountingEncoder(), WordLlamaEncoder(), spec)
    encoded: dict[str, int] = {}
    x = cached_encode(both, texts, tmp_path, 8, encoded, "law")
    # the sentence part comes from the cache the sentence encoder alone wrote: turning the
    # static part on re-encodes nothing with the (slow) sentence encoder
    assert both.sentence.texts == []
    np.testing.assert_array_equal(x[:, :256], x_sentence)
    np.testing.assert_array_equal(x, both.encode(texts))
    assert len(list(tmp_path.glob("*.npy"))) == 2  # one file per part
    assert encoded == {"law": 3}  # the static part's three texts
    new = ["tenant lease", "heap sort"]
    cached_encode(both, new, tmp_path, 8, encoded, "law")
    assert encoded == {"law": 5}  # a text encoded by both parts counts once
    cached_encode(both, new, tmp_path, 8, encoded, "law")
    assert encoded == {"law": 5}  # both parts cached


def _chunks(cfg: DictConfig, root: Path) -> dict[tuple[str, str, str], list[str]]:
    """The texts of each set, label and view: the documented unit of the embedding cache."""
    from loralab.routing.train import build_examples

    # the style shift's questions are the evaluated exam halves' chunks: not encoded again
    train, val, sets = build_examples(cfg, root)
    out: dict[tuple[str, str, str], list[str]] = {}
    for name, examples in {"train": train, "val": val, **sets}.items():
        for e in examples:
            out.setdefault((name, e.label, e.view), []).append(e.text)
    return out


def test_a_second_run_encodes_only_what_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_data(tmp_path / "data")
    cfg = _config(tmp_path)
    cache = tmp_path / "run" / "cache" / "router_embeddings"
    first, texts_1 = _train(cfg, monkeypatch)
    files = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.npy")}
    second, texts_2 = _train(cfg, monkeypatch)
    chunks = _chunks(cfg, tmp_path / "data")
    cached = Counter(t for texts in chunks.values() for t in texts)
    # the second run encodes only what is never cached (label descriptions, latency requests) ...
    assert Counter(texts_1) - Counter(texts_2) == cached
    assert not Counter(texts_2) - Counter(texts_1)
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*.npy")} == files
    # ... and the same embeddings give the same router and the same numbers
    assert second["model_version"] == first["model_version"]
    assert second["metrics"]["sets"] == first["metrics"]["sets"]

    # Change the first paragraph of one medical training question: of its views (instruction,
    # last paragraph, multiple choice) only the instruction changes, so only that chunk of
    # texts is encoded again, not the label's other views, sets or labels
    path = tmp_path / "data" / "medical.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    train_texts = set(chunks[("train", "medical", "instruction")])
    k = next(i for i, r in enumerate(rows) if r["instruction"] in train_texts)
    rows[k]["instruction"] = "Reworded. " + rows[k]["instruction"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, texts_3 = _train(cfg, monkeypatch)
    after = _chunks(cfg, tmp_path / "data")
    changed = {key: texts for key, texts in after.items() if chunks.get(key) != texts}
    assert list(changed) == [("train", "medical", "instruction")]
    assert rows[k]["instruction"] in changed[("train", "medical", "instruction")]
    assert Counter(texts_3) - Counter(texts_2) == Counter(t for v in changed.values() for t in v)
    assert not Counter(texts_2) - Counter(texts_3)
    assert sum(map(len, changed.values())) < sum(map(len, after.values())) / 4


@pytest.mark.slow
def test_train_router_with_real_minilm_and_real_data(tmp_path: Path) -> None:
    from loralab.data.records import default_data_root
    from loralab.io_utils import file_sha256
    from loralab.routing import train_router

    if not (default_data_root() / "law.jsonl").is_file():
        pytest.skip("the shared data folder is not available")
    cfg = compose(
        "train_router",
        [
            "router=minilm",
            "router.data.max_train_per_label=24",
            "router.data.max_val_per_label=8",
            "router.data.max_test_per_label=8",
            "router.data.max_check_per_group=1",
            "router.data.probe_set=false",
            "router.data.views=[instruction]",
            "router.latency_requests=3",
            "router.ood_prototypes_per_label=4",
            "router.finetune.enabled=true",
            "router.finetune.steps=2",
            "router.finetune.texts_per_label=8",
            "router.finetune.batch_per_label=2",
            "logger=none",
        ],
        tmp_path,
    )
    result = train_router(cfg)
    assert result["metrics"]["sets"]["test"]["accuracy"] >= 0.8
    # the encoder tuned for this router travels in its folder and is the one it loads
    saved = json.loads((tmp_path / "router" / "router.json").read_text())["encoder"]
    assert saved["bundled"] and saved["spec"]["name"] == "encoder"
    assert saved["fingerprint"]["weights_sha256"] == file_sha256(
        tmp_path / "router" / "encoder" / "model.safetensors"
    )
    assert not (tmp_path / "encoder").exists()  # kept once, in the router folder
    assert result["metrics"]["timing_s"]["finetune"] > 0
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
