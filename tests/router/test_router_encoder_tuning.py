"""router.finetune: the SetFit-style contrastive loss, tuning the packaged MiniLM, and the tuned
encoder saved with its router (moved, verified, refused when changed or missing)."""

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from loralab.routing.finetune import FinetuneConfig, finetune_encoder, supervised_contrastive_loss
from router import EncoderMismatchError, Router
from router.encoders import EncoderSpec, SentenceTransformerEncoder
from router.packaged_models import packaged_minilm_path
from router.persistence import RouterFileError
from tests.router.tests_router_helpers import LABELS, QUESTIONS, fit_toy_router

TEXTS = {
    "law": ["The tenant sued the landlord for breach of the lease.", "Is the contract void?",
            "The court granted the motion to dismiss.", "What is adverse possession?"],
    "code": ["Write a Python function that sorts a list.", "What does this loop print?",
             "Explain the time complexity of binary search.", "Fix the bug in this SQL query."],
}  # fmt: skip


def test_the_loss_is_the_mean_negative_log_probability_of_same_label_texts():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    emb = torch.stack([a, a, b, b])
    loss = supervised_contrastive_loss(emb, torch.tensor([0, 0, 1, 1]), temperature=1.0)
    # each text: one positive at cosine 1, two negatives at 0, itself left out
    assert float(loss) == pytest.approx(math.log(math.e + 2) - 1, rel=1e-6)
    sharper = supervised_contrastive_loss(emb, torch.tensor([0, 0, 1, 1]), temperature=0.1)
    assert float(sharper) < float(loss)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="batch_per_label must be >= 2"):
        FinetuneConfig(batch_per_label=1)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        FinetuneConfig(steps=0)
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['seed', 'step'\]"):
        FinetuneConfig.from_config({"enabled": True, "step": 3, "seed": 1})
    assert FinetuneConfig.from_config({"enabled": True, "steps": 3}, seed=5) == FinetuneConfig(
        steps=3, seed=5
    )
    with pytest.raises(ValueError, match=r"fewer texts than batch_per_label \(8\): \{'law': 4"):
        finetune_encoder(str(packaged_minilm_path()), TEXTS, FinetuneConfig(), Path("unused"))


def _loss(model_path: str) -> float:
    encoder = SentenceTransformerEncoder(EncoderSpec(name=model_path))
    texts = [t for group in TEXTS.values() for t in group]
    emb = torch.from_numpy(encoder.encode(texts))
    return float(supervised_contrastive_loss(emb, torch.tensor([0] * 4 + [1] * 4), 0.1))


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tuned") / "encoder"
    config = FinetuneConfig(steps=4, texts_per_label=4, batch_per_label=4, lr=1e-4, seed=0)
    return finetune_encoder(str(packaged_minilm_path()), TEXTS, config, out)


def test_tuning_lowers_the_loss_and_saves_safetensors(tuned):
    assert (tuned / "model.safetensors").is_file() and not list(tuned.glob("*.bin"))
    assert _loss(str(tuned)) < _loss(str(packaged_minilm_path()))


def test_a_router_carries_its_tuned_encoder(tuned, tmp_path):
    router = fit_toy_router(SentenceTransformerEncoder(EncoderSpec(name=str(tuned))))
    version = router.save(tmp_path / "a" / "router", bundle_encoder=True)
    assert (tmp_path / "a/router/encoder/model.safetensors").is_file()
    moved = tmp_path / "elsewhere"
    shutil.move(tmp_path / "a" / "router", moved)
    loaded = Router.load(moved)
    assert loaded.model_version == version
    questions = [q for qs in QUESTIONS.values() for q in qs]
    before, after = router.route_batch(questions), loaded.route_batch(questions)
    assert [d.label for d in after] == [d.label for d in before]
    np.testing.assert_allclose(
        [[d.probs.get(k, -1.0) for k in LABELS] for d in after],
        [[d.probs.get(k, -1.0) for k in LABELS] for d in before],
        rtol=1e-4,
    )
    assert router.save(tmp_path / "b", bundle_encoder=True) == version  # not tied to a path
    weights = moved / "encoder" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(64)  # the last weights zeroed: same shapes, other values
    weights.write_bytes(bytes(data))
    with pytest.raises(EncoderMismatchError, match="weights_sha256"):
        Router.load(moved)
    shutil.rmtree(moved / "encoder")
    with pytest.raises(RouterFileError, match="missing encoder/"):
        Router.load(moved)


def test_only_a_local_model_folder_can_be_bundled(tmp_path):
    from router.encoders import HashingEncoder

    with pytest.raises(ValueError, match="only a local sentence-transformers model folder"):
        fit_toy_router(HashingEncoder()).save(tmp_path / "r", bundle_encoder=True)
