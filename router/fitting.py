"""Fit a ``Router`` from embedded training and validation sets.

Train split: the head and the OOD prototypes. Validation split: the temperature and the abstention
thresholds. Descriptions of each label become a zero-shot prior added to the head's logits. An
optional set of requests in another style (exam questions) fits a ``StyleShift``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from router.calibration import fit_temperature, fit_thresholds
from router.classifier import (
    DescriptionPrior,
    HeadGate,
    NeighbourVotes,
    StyleShift,
    best_cosine,
    fit_head,
)
from router.core import Router
from router.encoders import Encoder, similarity_dim
from router.inputs import InputPolicy


@dataclass(frozen=True)
class FitConfig:
    """``head``: ``logreg`` (``c``) or ``mlp`` (``hidden``, ``alpha``). ``prior_weight`` x
    ``prior_scale`` x best cosine to a label's descriptions is added to its logit (0 = off).
    Thresholds: ``target_coverage`` or ``max_risk`` (one of them) on validation expert
    predictions; ``ood_quantile`` of validation OOD scores. ``prototypes_per_label`` k-means
    centroids per label (0 = no OOD check). ``head_gate``: (low, high) quantiles of the validation
    split's similarity to those centroids, between which the head's weight rises from 0 to 1
    (``HeadGate``; None = the head always counts fully). ``style_shift_l2``: the L2 penalty of a
    ``StyleShift`` fitted when ``fit_router`` is given requests of another style;
    ``style_shift_recalibrate``: fit it first and the temperature and thresholds after it (else
    they are fitted without it, and it at that temperature); ``style_shift_embedding_l2``: the L2
    penalty of its linear term on the embedding (None: no such term);
    ``style_shift_train_labels``: the labels whose training texts the gate does not fully open for
    join its requests, each label's together weighing at most ``style_shift_train_weight``
    requests (None: each text one); ``style_shift_neighbours``: with the embedding term, a linear
    term on the votes of a request's that many most similar exam-style requests
    (``NeighbourVotes``, ``style_shift_neighbour_temperature``; None: no such term)."""

    head: str = "logreg"
    c: float = 1.0
    hidden: tuple[int, ...] = (256,)
    alpha: float = 1e-3
    max_iter: int = 300
    prior_weight: float = 0.0
    prior_scale: float = 20.0
    calibrate: bool = True
    target_coverage: float | None = None
    max_risk: float | None = 0.02
    ood_quantile: float = 0.002
    prototypes_per_label: int = 32
    head_gate: tuple[float, float] | None = None
    style_shift_l2: float = 0.01
    style_shift_recalibrate: bool = False
    style_shift_embedding_l2: float | None = None
    style_shift_train_labels: tuple[str, ...] = ()
    style_shift_train_weight: float | None = None
    style_shift_neighbours: int | None = None
    style_shift_neighbour_temperature: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        if self.style_shift_neighbours is not None and (
            self.style_shift_neighbours < 1
            or self.style_shift_embedding_l2 is None
            or not self.style_shift_neighbour_temperature > 0
        ):
            raise ValueError(
                "style_shift_neighbours needs k >= 1, style_shift_embedding_l2 (its L2 penalty) "
                "and style_shift_neighbour_temperature > 0, got "
                f"{self.style_shift_neighbours}, {self.style_shift_embedding_l2}, "
                f"{self.style_shift_neighbour_temperature}"
            )
        if self.head_gate is not None:
            low, high = self.head_gate
            if not 0.0 <= low < high <= 1.0:
                raise ValueError(
                    f"head_gate quantiles need 0 <= low < high <= 1, got {low}, {high}"
                )
            if self.prototypes_per_label <= 0:
                raise ValueError(
                    "head_gate needs prototypes_per_label > 0: it weighs the head by the "
                    "similarity to those centroids"
                )


def description_prior(
    encoder: Encoder, labels: Sequence[str], descriptions: Mapping[str, Sequence[str]], scale: float
) -> DescriptionPrior:
    """Embed each label's descriptions; every label needs at least one."""
    texts, index = [], []
    for k, label in enumerate(labels):
        descs = [d for d in descriptions.get(label, []) if d.strip()]
        if not descs:
            raise ValueError(
                f"no description for label {label!r}; descriptions cover {sorted(descriptions)}"
            )
        texts += descs
        index += [k] * len(descs)
    embeddings = encoder.encode(texts)[:, : similarity_dim(encoder)]
    return DescriptionPrior(embeddings, np.asarray(index, dtype=np.int64), len(labels), scale)


def ood_prototypes(
    x: np.ndarray, y: np.ndarray, n_labels: int, per_label: int, seed: int = 0
) -> np.ndarray:
    """``per_label`` k-means centroids of each label's embeddings, renormalised: ``(p, dim)``."""
    from sklearn.cluster import KMeans

    protos = []
    for k in range(n_labels):
        xk = x[y == k]
        n = min(per_label, len(xk))
        if n == 0:
            continue
        if n == len(xk):
            centers = xk
        else:
            centers = KMeans(n_clusters=n, n_init=1, random_state=seed).fit(xk).cluster_centers_
        protos.append(centers / np.linalg.norm(centers, axis=1, keepdims=True))
    return np.concatenate(protos).astype(np.float32)


def fit_style_shift(
    gate: np.ndarray,
    head: np.ndarray,
    prior: np.ndarray,
    y: np.ndarray,
    l2: float = 0.01,
    temperature: float = 1.0,
    x: np.ndarray | None = None,
    embedding_l2: float | None = None,
    sample_weight: np.ndarray | None = None,
    neighbours: NeighbourVotes | None = None,
    votes: np.ndarray | None = None,
) -> StyleShift:
    """The ``StyleShift`` minimising the (``sample_weight``-weighted) mean cross-entropy of ``y``
    ``(n,)`` label ids under ``softmax(logits / temperature)``, plus ``l2`` x the squared norm of
    its prior mix, bias and head scale (zero: no shift), from the router's gate weights ``(n,)``,
    head logits and weighted prior logits ``(n, k)`` on those requests (L-BFGS). With
    ``embedding_l2``, a linear term on their embeddings ``x`` ``(n, dim)`` too, penalised by
    ``embedding_l2`` x its squared norm; with ``neighbours``, a linear term on their ``votes``
    ``(n, k)`` for those requests as well, penalised alike."""
    from scipy.optimize import minimize
    from scipy.special import log_softmax, softmax

    n, k = head.shape
    if len(y) != n or len(gate) != n or prior.shape != (n, k):
        raise ValueError(
            f"style shift inputs disagree: gate {gate.shape}, head {head.shape}, prior "
            f"{prior.shape}, labels {np.shape(y)}"
        )
    if l2 < 0:
        raise ValueError(f"style_shift_l2 must be >= 0, got {l2}")
    if embedding_l2 is not None and embedding_l2 <= 0:
        raise ValueError(
            f"style_shift_embedding_l2 must be > 0 (None: no term), got {embedding_l2}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if embedding_l2 is not None and (x is None or len(x) != n):
        raise ValueError(f"an embedding term needs embeddings for the {n} requests")
    if neighbours is not None and (embedding_l2 is None or votes is None or votes.shape != (n, k)):
        raise ValueError(f"a vote term needs the embedding term and votes ({n}, {k})")
    w = np.ones(n) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    if w.shape != (n,) or (w < 0).any() or not w.sum() > 0:
        raise ValueError(f"sample_weight needs {n} weights >= 0 with a positive sum")
    g = gate.astype(np.float64)[:, None]
    u = 1.0 - g
    # fitted on logits / temperature: the same shift, its bias scaled back, acts on the logits
    h, p = head.astype(np.float64) / temperature, prior.astype(np.float64) / temperature
    e = None if embedding_l2 is None else np.asarray(x, dtype=np.float64)
    if e is not None and neighbours is not None:  # the votes join the embedding's columns
        e = np.hstack([e, np.asarray(votes, dtype=np.float64)])
    dim = 0 if e is None else e.shape[1]
    onehot = np.eye(k)[y]
    w, total = w[:, None], float(w.sum())
    m = k * k + k + 1  # prior mix, bias and head scale; the embedding term after them

    def unpack(t: np.ndarray) -> StyleShift:
        return StyleShift(
            t[: k * k].reshape(k, k),
            t[k * k : k * k + k],
            float(t[m - 1]),
            t[m:].reshape(k, dim) if dim else None,
        )

    def loss_and_grad(t: np.ndarray) -> tuple[float, np.ndarray]:
        z = unpack(t).logits(g[:, 0], h, p, e)
        a, b = t[:m], t[m:]
        penalty = l2 * float(a @ a) + (embedding_l2 or 0.0) * float(b @ b)
        loss = -(log_softmax(z, axis=1) * onehot * w).sum() / total + penalty
        dz = (softmax(z, axis=1) - onehot) * w / total  # (n, k)
        du = u * dz
        grad = [(du.T @ p).ravel(), du.sum(axis=0), [float((g * du * h).sum())]]
        if e is not None:
            grad.append((du.T @ e).ravel())
        return loss, np.concatenate(grad) + 2.0 * np.concatenate(
            [l2 * a, (embedding_l2 or 0.0) * b]
        )

    t = minimize(loss_and_grad, np.zeros(m + k * dim), jac=True, method="L-BFGS-B").x
    shift = unpack(t)
    # the bias and the linear terms are scaled back to act on the logits
    linear = None
    if shift.embedding_weight is not None:
        linear = (shift.embedding_weight * temperature).astype(np.float32)
    vote_weight = None
    if linear is not None and neighbours is not None:
        linear, vote_weight = linear[:, :-k], linear[:, -k:]
    return StyleShift(
        shift.prior_mix.astype(np.float32),
        (shift.bias * temperature).astype(np.float32),
        shift.head_scale,
        linear,
        vote_weight,
        neighbours if vote_weight is not None else None,
    )


def off_style_rows(
    gate: HeadGate,
    x: np.ndarray,
    y: np.ndarray,
    labels: Sequence[str],
    of_labels: Sequence[str],
) -> np.ndarray:
    """``(n,)`` mask of the rows of ``x`` (similarity columns) / ``y`` (label ids) whose label is
    among ``of_labels`` and that ``gate`` does not fully open for."""
    unknown = sorted(set(of_labels) - set(labels))
    if unknown:
        raise ValueError(f"style_shift_train_labels {unknown} are not among labels {list(labels)}")
    ids = [list(labels).index(label) for label in of_labels]
    return (gate.weights(x) < 1.0) & np.isin(y, ids)


def _fit_style_shift(
    router: Router,
    x: np.ndarray,
    xs: np.ndarray,
    y: np.ndarray,
    weight: np.ndarray,
    groups: np.ndarray,
    n_examples: int,
    cfg: FitConfig,
) -> None:
    """Fit ``router.style_shift`` on requests ``x`` (``xs``: their similarity columns) / ``y``
    (``weight`` each) at the router's temperature. With ``cfg.style_shift_neighbours``, the first
    ``n_examples`` (the exam-style ones) are the neighbours that vote, never for a request of their
    own group (``groups``: one per request)."""
    assert router.head_gate is not None and router.prior is not None  # fit_router checked
    neighbours, votes = None, None
    if cfg.style_shift_neighbours is not None:
        neighbours = NeighbourVotes(
            xs[:n_examples].astype(np.float32),
            y[:n_examples].astype(np.int64),
            len(router.labels),
            cfg.style_shift_neighbours,
            cfg.style_shift_neighbour_temperature,
        )
        votes = neighbours.votes(xs, groups, groups[:n_examples])
    router.style_shift = fit_style_shift(
        router.head_gate.weights(xs),
        router.head.logits(x),
        router.prior_weight * router.prior.logits(xs),
        y,
        cfg.style_shift_l2,
        router.temperature,
        x=x,
        embedding_l2=cfg.style_shift_embedding_l2,
        sample_weight=weight,
        neighbours=neighbours,
        votes=votes,
    )


def style_shift_train_weights(y: np.ndarray, n_labels: int, cap: float | None) -> np.ndarray:
    """``(n,)`` weights of off-style training texts with label ids ``y``: 1 each, or where a
    label has more than ``cap`` of them, ``cap`` / their number (each label weighs at most
    ``cap`` requests)."""
    if cap is None:
        return np.ones(len(y))
    if cap <= 0:
        raise ValueError(f"style_shift_train_weight must be > 0, got {cap}")
    counts = np.bincount(y, minlength=n_labels).astype(np.float64)
    return np.minimum(1.0, cap / np.maximum(counts, 1.0))[y]


def fit_router(
    encoder: Encoder,
    labels: Sequence[str],
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    descriptions: Mapping[str, Sequence[str]] | None = None,
    sample_weight: np.ndarray | None = None,
    policy: InputPolicy | None = None,
    config: FitConfig | None = None,
    base_label: str = "base",
    x_style: np.ndarray | None = None,
    y_style: np.ndarray | None = None,
    style_groups: Sequence[str] | None = None,
    style_weight: np.ndarray | None = None,
) -> Router:
    """A calibrated router: head on ``x_train`` ``(n, dim)`` / ``y_train`` ``(n,)`` label ids,
    temperature and thresholds on ``x_val`` / ``y_val``, and a ``StyleShift`` on ``x_style`` /
    ``y_style`` when given, with the training texts of ``config.style_shift_train_labels`` that the
    gate does not fully open for (it needs the head gate and the prior; before the temperature and
    thresholds with ``config.style_shift_recalibrate``, else after them, at that temperature).
    ``style_groups``: the group (e.g. the check) of each ``x_style`` row, whose rows never vote for
    each other in the shift's neighbour term (None: each row its own group); ``style_weight``: the
    weight of each ``x_style`` row in the shift's fit (None: one each)."""
    cfg = config or FitConfig()
    labels = tuple(labels)
    head = fit_head(
        x_train,
        y_train,
        len(labels),
        cfg.head,
        c=cfg.c,
        hidden=cfg.hidden,
        alpha=cfg.alpha,
        max_iter=cfg.max_iter,
        sample_weight=sample_weight,
        seed=cfg.seed,
    )
    prior = None
    if descriptions and cfg.prior_weight:
        prior = description_prior(encoder, labels, descriptions, cfg.prior_scale)
    prototypes, gate = None, None
    sim = similarity_dim(encoder)  # the prior, the gate and the OOD check read these columns
    if cfg.prototypes_per_label > 0:
        prototypes = ood_prototypes(
            x_train[:, :sim], y_train, len(labels), cfg.prototypes_per_label, cfg.seed
        )
        if cfg.head_gate is not None:
            low, high = np.quantile(best_cosine(x_val[:, :sim], prototypes), cfg.head_gate)
            gate = HeadGate(prototypes, float(low), float(high))
        if prior is not None:
            prototypes = np.concatenate([prototypes, prior.embeddings]).astype(np.float32)
    router = Router(
        encoder=encoder,
        labels=labels,
        head=head,
        policy=policy or InputPolicy(),
        prior=prior,
        prior_weight=cfg.prior_weight if prior is not None else 0.0,
        prototypes=prototypes,
        head_gate=gate,
        similarity_dim=sim if sim != encoder.dim else None,
        descriptions={k: list(v) for k, v in (descriptions or {}).items()},
        base_label=base_label,
    )
    style = None
    if x_style is not None and y_style is not None and len(y_style):
        if gate is None or prior is None or not cfg.prior_weight:
            raise ValueError("a style shift needs the head gate and the description prior")
        off = off_style_rows(gate, x_train[:, :sim], y_train, labels, cfg.style_shift_train_labels)
        if style_weight is not None and style_weight.shape != y_style.shape:
            raise ValueError(
                f"style_weight has shape {style_weight.shape} for {len(y_style)} requests"
            )
        x_all = np.concatenate([x_style, x_train[off]])
        weight = np.concatenate(
            [
                np.ones(len(y_style)) if style_weight is None else style_weight,
                style_shift_train_weights(y_train[off], len(labels), cfg.style_shift_train_weight),
            ]
        )
        y_all = np.concatenate([y_style, y_train[off]])
        n = len(y_style)
        if style_groups is not None and len(style_groups) != n:
            raise ValueError(f"style_groups has {len(style_groups)} entries for {n} requests")
        groups = np.array(
            [*map(str, style_groups if style_groups is not None else range(n)), *[""] * off.sum()]
        )
        style = (x_all, x_all[:, :sim], y_all, weight, groups, n, cfg)
    if style is not None and cfg.style_shift_recalibrate:
        _fit_style_shift(router, *style)
    if cfg.calibrate:
        router.temperature = fit_temperature(router.logits(x_val), y_val)
    scores = router.scores(x_val)
    router.thresholds = fit_thresholds(
        scores.probs,
        y_val,
        router.labels.index(base_label),
        scores.ood,
        target_coverage=cfg.target_coverage,
        max_risk=cfg.max_risk,
        ood_quantile=cfg.ood_quantile,
    )
    if style is not None and not cfg.style_shift_recalibrate:
        _fit_style_shift(router, *style)
    return router
