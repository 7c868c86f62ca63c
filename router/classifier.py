"""Classifier heads on frozen embeddings, run in plain numpy (fast, stateless, thread-safe).

Heads are fitted with scikit-learn (imported lazily) and exported to arrays, so a saved router is
arrays + JSON, never a pickled estimator. ``DescriptionPrior`` scores an embedding by its cosine
similarity to a few natural-language descriptions of each label (zero-shot).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

HEAD_KINDS = ("logreg", "mlp")


class Head(Protocol):
    @property
    def kind(self) -> str: ...

    def logits(self, x: np.ndarray) -> np.ndarray:
        """``(n, dim)`` embeddings -> ``(n, n_labels)`` logits."""
        ...

    def tensors(self) -> dict[str, np.ndarray]: ...

    def config(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class LinearHead:
    """Multinomial logistic regression: ``logits = x @ weight.T + bias``."""

    weight: np.ndarray  # (n_labels, dim)
    bias: np.ndarray  # (n_labels,)
    kind: str = "logreg"

    def logits(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weight.T + self.bias

    def tensors(self) -> dict[str, np.ndarray]:
        return {"head.weight": self.weight, "head.bias": self.bias}

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind}


@dataclass(frozen=True)
class MLPHead:
    """ReLU MLP: ``weights[i]`` is ``(in, out)`` as in scikit-learn's ``coefs_``."""

    weights: tuple[np.ndarray, ...]
    biases: tuple[np.ndarray, ...]
    kind: str = "mlp"

    def logits(self, x: np.ndarray) -> np.ndarray:
        h = x
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = h @ w + b
            if i < len(self.weights) - 1:
                h = np.maximum(h, 0.0)
        return h

    def tensors(self) -> dict[str, np.ndarray]:
        out = {}
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            out[f"head.layers.{i}.weight"] = w
            out[f"head.layers.{i}.bias"] = b
        return out

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "n_layers": len(self.weights)}


def head_from_tensors(config: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> Head:
    """Rebuild a head saved by ``Head.tensors`` / ``Head.config``; KeyError names a missing array."""
    kind = config.get("kind")
    if kind == "logreg":
        return LinearHead(np.asarray(tensors["head.weight"]), np.asarray(tensors["head.bias"]))
    if kind == "mlp":
        n = int(config["n_layers"])
        ws = tuple(np.asarray(tensors[f"head.layers.{i}.weight"]) for i in range(n))
        bs = tuple(np.asarray(tensors[f"head.layers.{i}.bias"]) for i in range(n))
        return MLPHead(ws, bs)
    raise ValueError(f"unknown head kind {kind!r}; expected one of {HEAD_KINDS}")


def fit_head(
    x: np.ndarray,
    y: np.ndarray,
    n_labels: int,
    kind: str = "logreg",
    *,
    c: float = 1.0,
    hidden: Sequence[int] = (256,),
    alpha: float = 1e-3,
    max_iter: int = 300,
    sample_weight: np.ndarray | None = None,
    seed: int = 0,
) -> Head:
    """Fit a head on embeddings ``x`` ``(n, dim)`` and label ids ``y`` ``(n,)`` in ``[0, n_labels)``.

    ``logreg``: L2-regularised multinomial logistic regression (``c`` = inverse strength), classes
    weighted to balance. ``mlp``: scikit-learn MLP with ``hidden`` sizes and L2 ``alpha``.
    """
    present = np.unique(y)
    if len(present) != n_labels:
        raise ValueError(f"training labels cover {present.tolist()}, need all of 0..{n_labels - 1}")
    if kind == "logreg":
        from sklearn.linear_model import LogisticRegression

        counts = np.bincount(y, minlength=n_labels).astype(np.float64)
        balance = (len(y) / (n_labels * counts))[y]
        w = balance if sample_weight is None else balance * sample_weight
        lr = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
        lr.fit(x, y, sample_weight=w)
        return LinearHead(lr.coef_.astype(np.float32), lr.intercept_.astype(np.float32))
    if kind == "mlp":
        from sklearn.neural_network import MLPClassifier

        mlp = MLPClassifier(
            hidden_layer_sizes=tuple(hidden),
            alpha=alpha,
            max_iter=max_iter,
            random_state=seed,
            early_stopping=True,
            n_iter_no_change=10,
        )
        mlp.fit(x, y)
        ws = tuple(np.asarray(w, dtype=np.float32) for w in mlp.coefs_)
        bs = tuple(np.asarray(b, dtype=np.float32) for b in mlp.intercepts_)
        if ws[-1].shape[1] == 1:  # sklearn collapses two classes to one logit; never with >2
            raise ValueError("the MLP head needs at least three labels")
        return MLPHead(ws, bs)
    raise ValueError(f"unknown head kind {kind!r}; expected one of {HEAD_KINDS}")


@dataclass(frozen=True)
class DescriptionPrior:
    """Zero-shot logits: ``scale`` x the best cosine similarity to each label's descriptions.

    ``embeddings`` ``(m, dim)`` unit rows; ``label_index`` ``(m,)`` the label id of each row.
    """

    embeddings: np.ndarray
    label_index: np.ndarray
    n_labels: int
    scale: float = 20.0
    _present: np.ndarray = field(init=False, repr=False, compare=False)  # label ids with rows
    _starts: np.ndarray = field(init=False, repr=False, compare=False)  # first row of each

    def __post_init__(self) -> None:
        # Group rows by label once, so that scoring is one matmul and one maximum.reduceat.
        order = np.argsort(self.label_index, kind="stable")
        object.__setattr__(self, "embeddings", np.ascontiguousarray(self.embeddings[order]))
        object.__setattr__(self, "label_index", np.ascontiguousarray(self.label_index[order]))
        present, starts = np.unique(self.label_index, return_index=True)
        object.__setattr__(self, "_present", present)
        object.__setattr__(self, "_starts", starts)

    def similarities(self, x: np.ndarray) -> np.ndarray:
        """``(n, dim)`` -> ``(n, n_labels)`` best cosine to each label's descriptions (-1 if none)."""
        out = np.full((x.shape[0], self.n_labels), -1.0, dtype=np.float32)
        if len(self._present):
            out[:, self._present] = np.maximum.reduceat(x @ self.embeddings.T, self._starts, axis=1)
        return out

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.scale * self.similarities(x)


def best_cosine(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``(n, dim)`` unit embeddings, ``(p, dim)`` unit rows -> ``(n,)`` best cosine to a row."""
    return (x @ rows.T).max(axis=1)


@dataclass(frozen=True)
class HeadGate:
    """How much the trained head counts for each input, in ``[0, 1]``.

    The head is fitted on the training data's styles and extrapolates confidently off them (a
    database-theory exam question read as a general question); the description prior does not
    depend on them. The weight is 0 where the input's best cosine to the training prototypes
    ``(p, dim)`` is at most ``low``, 1 from ``high`` on, linear between; ``fit_router`` sets
    ``low`` and ``high`` at quantiles of the validation split's similarities.
    """

    prototypes: np.ndarray  # (p, dim) unit rows: k-means centroids of the training embeddings
    low: float
    high: float

    def __post_init__(self) -> None:
        if not self.high > self.low:
            raise ValueError(f"head gate needs high > low, got low={self.low}, high={self.high}")

    def weights(self, x: np.ndarray) -> np.ndarray:
        """``(n, dim)`` -> ``(n,)`` head weights."""
        similarity = best_cosine(x, self.prototypes)
        return np.clip((similarity - self.low) / (self.high - self.low), 0.0, 1.0)


@dataclass(frozen=True)
class NeighbourVotes:
    """Label votes of a request's ``k`` most similar labelled examples.

    ``embeddings`` ``(m, dim)`` are unit rows (similarity columns) with label ids ``label_index``
    ``(m,)``; the ``k`` nearest by cosine vote with weights ``softmax(cosine / temperature)``, so a
    request's votes ``(n_labels,)`` sum to 1.
    """

    embeddings: np.ndarray  # (m, dim) unit rows
    label_index: np.ndarray  # (m,) label ids
    n_labels: int
    k: int
    temperature: float

    def __post_init__(self) -> None:
        m = len(self.embeddings)
        if self.embeddings.ndim != 2 or self.label_index.shape != (m,):
            raise ValueError(
                f"neighbour votes need embeddings (m, dim) and label ids (m,), got "
                f"{self.embeddings.shape} and {self.label_index.shape}"
            )
        if not 1 <= self.k <= m:
            raise ValueError(f"neighbour votes need 1 <= k <= {m} examples, got k={self.k}")
        if not self.temperature > 0:
            raise ValueError(f"neighbour votes need temperature > 0, got {self.temperature}")
        if (
            m
            and not 0 <= int(self.label_index.min()) <= int(self.label_index.max()) < self.n_labels
        ):
            raise ValueError(f"neighbour label ids must lie in [0, {self.n_labels})")

    def votes(
        self,
        x: np.ndarray,
        groups: np.ndarray | None = None,
        example_groups: np.ndarray | None = None,
    ) -> np.ndarray:
        """``(n, dim)`` unit embeddings -> ``(n, n_labels)`` votes. With ``groups`` ``(n,)`` and
        ``example_groups`` ``(m,)``, a request's own group's examples do not vote (fitting on the
        examples themselves, as if each group were new)."""
        k = self.k
        if groups is not None and example_groups is not None:
            groups, example_groups = np.asarray(groups), np.asarray(example_groups)
            names, counts = np.unique(example_groups, return_counts=True)
            own = dict(zip(names.tolist(), counts.tolist(), strict=True))
            k = min(k, len(example_groups) - max(own.get(g, 0) for g in groups.tolist()))
            if k < 1:
                raise ValueError("a request's group holds every example: none left to vote")
        out = np.zeros((len(x), self.n_labels), dtype=np.float32)
        for i in range(0, len(x), 1024):  # rows in chunks: (chunk, m) similarities at a time
            sim = (x[i : i + 1024] @ self.embeddings.T).astype(np.float64)
            if groups is not None and example_groups is not None:
                sim[groups[i : i + 1024, None] == example_groups[None, :]] = -np.inf
            idx = np.argpartition(-sim, k - 1, axis=1)[:, :k]  # (chunk, k) the k most similar
            top = np.take_along_axis(sim, idx, axis=1)
            w = np.exp((top - top.max(axis=1, keepdims=True)) / self.temperature)
            w /= w.sum(axis=1, keepdims=True)
            rows = np.repeat(np.arange(len(idx)), k)
            chunk = np.zeros((len(idx), self.n_labels))
            np.add.at(chunk, (rows, self.label_index[idx].ravel()), w.ravel())
            out[i : i + 1024] = chunk
        return out


@dataclass(frozen=True)
class StyleShift:
    """A correction of how the head and the prior combine on requests unlike the training data.

    The head is fitted on the training data's styles and the head gate already turns it down off
    them; ``StyleShift`` is fitted on labelled requests of another style (exam questions) and only
    acts where the gate is not fully open. With ``g`` the gate weight, ``u = 1 - g`` and ``x`` the
    request's embedding (the head's columns)::

        logits = g (1 + u head_scale) head + prior
                 + u (prior @ prior_mix.T + bias + x @ W.T + votes @ V.T)

    (``W`` = ``embedding_weight``, ``V`` = ``vote_weight`` on the ``neighbours``' votes; without
    them those terms are 0), so a request the gate reads as the training data's own (``g = 1``)
    gets exactly the router's logits without it.
    """

    prior_mix: np.ndarray  # (n_labels, n_labels) added to the identity on the prior's logits
    bias: np.ndarray  # (n_labels,)
    head_scale: float
    embedding_weight: np.ndarray | None = None  # (n_labels, dim): a linear term on the embedding
    vote_weight: np.ndarray | None = None  # (n_labels, n_labels): a linear term on the votes
    neighbours: NeighbourVotes | None = None  # whose votes (with vote_weight)

    def __post_init__(self) -> None:
        k = len(self.bias)
        if self.prior_mix.shape != (k, k) or self.bias.shape != (k,):
            raise ValueError(
                f"style shift needs prior_mix (k, k) and bias (k,), got {self.prior_mix.shape} "
                f"and {self.bias.shape}"
            )
        w = self.embedding_weight
        if w is not None and (w.ndim != 2 or w.shape[0] != k):
            raise ValueError(f"style shift embedding_weight needs shape ({k}, dim), got {w.shape}")
        if (self.vote_weight is None) != (self.neighbours is None):
            raise ValueError("style shift needs vote_weight and neighbours together")
        v, nb = self.vote_weight, self.neighbours
        if v is not None and nb is not None and (v.shape != (k, k) or nb.n_labels != k):
            raise ValueError(
                f"style shift vote_weight needs shape ({k}, {k}) and neighbours of {k} labels, "
                f"got {v.shape} and {nb.n_labels}"
            )

    def logits(
        self,
        gate: np.ndarray,
        head: np.ndarray,
        prior: np.ndarray,
        x: np.ndarray | None = None,
        votes: np.ndarray | None = None,
    ) -> np.ndarray:
        """Gate weights ``(n,)``, head logits and (weighted) prior logits ``(n, k)``, with an
        embedding term the embeddings ``x`` ``(n, dim)``, with a vote term the ``neighbours``'
        votes ``(n, k)`` -> ``(n, k)``."""
        g = gate[:, None]
        u = 1.0 - g
        shift = prior @ self.prior_mix.T + self.bias
        if self.embedding_weight is not None:
            if x is None or x.shape[1:] != self.embedding_weight.shape[1:]:
                raise ValueError(
                    f"style shift needs embeddings of dim {self.embedding_weight.shape[1]}, got "
                    f"{None if x is None else x.shape}"
                )
            shift = shift + x @ self.embedding_weight.T
        if self.vote_weight is not None:
            if votes is None or votes.shape != head.shape:
                raise ValueError(
                    f"style shift needs votes {head.shape}, got {None if votes is None else votes.shape}"
                )
            shift = shift + votes @ self.vote_weight.T
        return g * (1.0 + u * self.head_scale) * head + prior + u * shift
