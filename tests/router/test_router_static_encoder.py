"""The WordLlama static encoder and the concatenated encoder: the head reads both parts, the
cosine-based parts of the router (prior, gate, OOD check) read the sentence embedding alone."""

import json
from pathlib import Path

import numpy as np
import pytest

from router import EncoderMismatchError, Router
from router.classifier import LinearHead
from router.encoders import (
    ConcatEncoder,
    EncoderSpec,
    HashingEncoder,
    WordLlamaEncoder,
    build_encoder,
)
from tests.router.tests_router_helpers import LABELS, QUESTIONS, fit_toy_router

TEXTS = [
    "In a Kerberos system, the ticket-granting ticket is issued by:",
    "Which type of RNA carries amino acids to the ribosome?",
    "Über naïve café, 日本語",
    "word " * 3000,
]


@pytest.fixture(scope="module")
def wordllama() -> WordLlamaEncoder:
    return WordLlamaEncoder()


@pytest.fixture(scope="module")
def concat() -> ConcatEncoder:
    encoder = build_encoder({"kind": "hashing", "static": "wordllama"})
    assert isinstance(encoder, ConcatEncoder)
    return encoder


def test_wordllama_matches_the_package_s_own_inference_and_is_batch_independent(wordllama):
    import wordllama as package
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer
    from wordllama.inference import WordLlamaInference

    root = Path(package.__file__).parent
    reference = WordLlamaInference(
        load_file(str(root / "weights/l2_supercat_256.safetensors"))["embedding.weight"],
        Tokenizer.from_file(str(root / "tokenizers/l2_supercat_tokenizer_config.json")),
    )
    x = wordllama.encode(TEXTS)
    assert x.shape == (len(TEXTS), 256) and x.dtype == np.float32
    np.testing.assert_allclose(x, reference.embed(TEXTS, norm=True), atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    alone = np.concatenate([wordllama.encode([t]) for t in TEXTS])
    np.testing.assert_array_equal(alone, x)
    # no token, no direction: a zero row rather than NaN
    np.testing.assert_array_equal(wordllama.encode([""]), np.zeros((1, 256), np.float32))
    fingerprint = wordllama.fingerprint()
    assert fingerprint["dim"] == 256 and len(fingerprint["weights_sha256"]) == 64


def test_the_concatenated_encoder_puts_the_sentence_embedding_first(concat, wordllama):
    x = concat.encode(TEXTS)
    assert (concat.dim, concat.similarity_dim, x.shape) == (512, 256, (len(TEXTS), 512))
    np.testing.assert_array_equal(x[:, :256], HashingEncoder().encode(TEXTS))
    np.testing.assert_array_equal(x[:, 256:], wordllama.encode(TEXTS))
    assert concat.fingerprint()["static"] == wordllama.fingerprint()
    with pytest.raises(ValueError, match="unknown static encoder 'glove'"):
        build_encoder({"kind": "hashing", "static": "glove"})


def test_a_router_on_the_concatenated_encoder_keeps_its_similarities_on_the_sentence_part(
    concat, tmp_path
):
    router = fit_toy_router(concat, head_gate=(0.0, 0.5))
    assert router.similarity_dim == 256
    assert router.head.tensors()["head.weight"].shape == (len(LABELS), 512)
    for part in (router.prototypes, router.head_gate.prototypes, router.prior.embeddings):
        assert part.shape[1] == 256
    for label in LABELS:
        assert router.route(QUESTIONS[label]).label == label
    x = concat.encode(list(TEXTS))
    sentence_only = Router(  # the same router parts over the sentence embedding alone
        encoder=HashingEncoder(),
        labels=router.labels,
        head=LinearHead(np.zeros((len(LABELS), 256), np.float32), np.zeros(len(LABELS))),
        prior=router.prior,
        prior_weight=router.prior_weight,
        prototypes=router.prototypes,
        head_gate=router.head_gate,
    )
    # the OOD score, the gate weight and the prior are those of the sentence embedding: with the
    # head's weights on the static columns zeroed, the two routers give the same logits
    np.testing.assert_allclose(router.scores(x).ood, sentence_only.scores(x[:, :256]).ood)
    weight, bias = router.head.tensors().values()
    sentence_only.head = LinearHead(weight[:, :256], bias)
    no_static = x.copy()
    no_static[:, 256:] = 0.0
    np.testing.assert_allclose(
        router.logits(no_static), sentence_only.logits(x[:, :256]), rtol=1e-5, atol=1e-6
    )

    router.save(tmp_path / "r")
    config = json.loads((tmp_path / "r" / "router.json").read_text())
    assert config["similarity_dim"] == 256 and config["encoder"]["spec"]["static"] == "wordllama"
    loaded = Router.load(tmp_path / "r")
    assert loaded.similarity_dim == 256 and loaded.model_version == router.model_version
    for text in TEXTS:
        assert loaded.route(text).probs == pytest.approx(router.route(text).probs, abs=1e-6)
    with pytest.raises(EncoderMismatchError, match="static"):
        Router.load(tmp_path / "r", encoder=HashingEncoder())


def test_a_router_without_a_static_encoder_saves_no_similarity_dim(tmp_path):
    router = fit_toy_router(HashingEncoder())
    assert router.similarity_dim is None
    router.save(tmp_path / "r")
    assert "similarity_dim" not in json.loads((tmp_path / "r" / "router.json").read_text())


def test_an_encoder_spec_writes_static_only_when_set(tmp_path):
    # a spec saved before `static` existed reads back to the same dict, so the model version of a
    # router without a static encoder is what it was before the setting was added
    before = {"kind": "hashing", "name": "hashing", "quantize": None, "max_seq_length": None}
    before |= {"threads": None, "dim": 256}
    assert EncoderSpec.from_dict(before).to_dict() == before
    assert EncoderSpec.from_dict({**before, "static": None}).to_dict() == before
    assert EncoderSpec(static="wordllama").to_dict()["static"] == "wordllama"
    router = fit_toy_router(build_encoder({"kind": "hashing", "static": None}))
    router.save(tmp_path / "r")
    saved = json.loads((tmp_path / "r" / "router.json").read_text())
    assert "static" not in saved["encoder"]["spec"]
    assert Router.load(tmp_path / "r").model_version == router.model_version
