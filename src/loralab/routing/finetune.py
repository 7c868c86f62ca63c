"""SetFit-style contrastive tuning of the router's sentence encoder before its head is fitted.

Batches of ``batch_per_label`` texts from every label (sampled from the train split's views, with
each label's descriptions among them) and the supervised contrastive loss of Khosla et al. (2020):
each text is pulled towards the other texts of its label and pushed from the rest, so the encoder
separates the router's labels in every style the training views show. The tuned encoder is saved as
a sentence-transformers folder (safetensors) that ``router.Router.save`` bundles with the router.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loralab.io_utils import atomic_directory

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneConfig:
    """``router.finetune``: ``steps`` optimizer steps of ``batch_per_label`` texts per label, drawn
    from ``texts_per_label`` per label; AdamW at ``lr`` (linear warm-up over a tenth of the steps,
    then linear decay); the contrastive loss at ``temperature``; texts cut at ``max_seq_length``."""

    steps: int = 150
    texts_per_label: int = 400
    batch_per_label: int = 8
    lr: float = 2e-5
    temperature: float = 0.1
    max_seq_length: int = 128
    seed: int = 0

    @classmethod
    def from_config(cls, d: Mapping[str, Any], seed: int = 0) -> FinetuneConfig:
        """From ``router.finetune`` (its ``enabled`` switch aside); unknown keys are refused."""
        settings = {k: v for k, v in d.items() if k != "enabled"}
        unknown = sorted(set(settings) - (set(cls.__dataclass_fields__) - {"seed"}))
        if unknown:
            raise ValueError(f"router.finetune: unknown setting(s) {unknown}")
        return cls(**settings, seed=seed)

    def __post_init__(self) -> None:
        for name in ("steps", "texts_per_label", "max_seq_length"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"router.finetune.{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_per_label < 2:
            raise ValueError(
                f"router.finetune.batch_per_label must be >= 2 (a text needs a positive), got "
                f"{self.batch_per_label}"
            )
        if self.lr <= 0 or self.temperature <= 0:
            raise ValueError(
                f"router.finetune.lr and temperature must be > 0, got {self.lr}, {self.temperature}"
            )


def supervised_contrastive_loss(embeddings: Any, labels: Any, temperature: float) -> Any:
    """Mean over texts of -log softmax similarity to each same-label text (Khosla et al. 2020).

    embeddings [N, D] (L2-normalised), labels [N]; every text needs another of its label."""
    import torch

    n = embeddings.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=embeddings.device)
    sim = (embeddings @ embeddings.T / temperature).masked_fill(eye, float("-inf"))  # [N, N]
    log_p = sim.log_softmax(dim=1).masked_fill(eye, 0.0)
    positive = (labels[:, None] == labels[None, :]) & ~eye  # [N, N]
    per_text = -(log_p * positive).sum(1) / positive.sum(1).clamp_min(1)
    return per_text.mean()


def finetune_encoder(
    model_path: str,
    texts: Mapping[str, Sequence[str]],
    config: FinetuneConfig,
    out_dir: Path,
) -> Path:
    """Tune the sentence-transformers model at ``model_path`` on ``texts`` (label -> texts, at
    least ``batch_per_label`` each) and save it to ``out_dir`` (atomically); returns ``out_dir``."""
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import get_linear_schedule_with_warmup

    short = {k: len(v) for k, v in texts.items() if len(v) < config.batch_per_label}
    if short:
        raise ValueError(
            f"router.finetune: labels with fewer texts than batch_per_label "
            f"({config.batch_per_label}): {short}"
        )
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    pools = {k: rng.sample(list(v), min(config.texts_per_label, len(v))) for k, v in texts.items()}
    model = SentenceTransformer(model_path, device="cpu")
    full_length = model.max_seq_length
    model.max_seq_length = config.max_seq_length
    preprocess = getattr(model, "preprocess", None) or model.tokenize
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
    schedule = get_linear_schedule_with_warmup(optimizer, max(1, config.steps // 10), config.steps)
    model.train()
    started = time.perf_counter()
    for step in range(config.steps):
        batch, ids = [], []
        for k, pool in enumerate(pools.values()):
            batch += rng.sample(pool, config.batch_per_label)
            ids += [k] * config.batch_per_label
        emb = model(preprocess(batch))["sentence_embedding"]  # [N, D]
        loss = supervised_contrastive_loss(
            torch.nn.functional.normalize(emb, dim=-1), torch.tensor(ids), config.temperature
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 25 == 0 or step == config.steps - 1:
            log.info(
                "encoder finetune step %d/%d: loss %.4f (%.0f s)",
                step + 1,
                config.steps,
                loss.item(),
                time.perf_counter() - started,
            )
    model.eval()
    model.max_seq_length = full_length  # the router reads as much text as the base encoder
    with atomic_directory(out_dir) as tmp:
        model.save(str(tmp), create_model_card=False, safe_serialization=True)
    return out_dir
