"""Tiny random Llama + three PEFT experts (different ranks and alphas, random B) for moelora tests."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FINGERPRINT = "tiny-llama-fingerprint"
# name -> (r, lora_alpha, seed); different ranks and alphas so scaling and padding are exercised.
EXPERT_SPECS = {"law": (4, 8, 1), "code": (2, 4, 2), "medical": (6, 6, 3)}


def make_base(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def write_expert(
    folder: Path,
    base: torch.nn.Module,
    domain: str,
    r: int,
    alpha: int,
    seed: int,
    target_modules: str | list[str] = "all-linear",
) -> Path:
    """A PEFT adapter with random A and B saved by save_pretrained, plus the lab's manifest."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=target_modules, init_lora_weights=False
    )
    peft_model = get_peft_model(copy.deepcopy(base), config)
    peft_model.save_pretrained(str(folder))
    write_manifest(folder, domain, r, alpha)
    return folder


def write_manifest(folder: Path, domain: str, r: int, alpha: int) -> None:
    from moelora.experts import file_sha256

    manifest = {
        "domain": domain,
        "base_model": {"name": "tiny-llama", "fingerprint": FINGERPRINT},
        "adapter_sha256": file_sha256(folder / "adapter_model.safetensors"),
        "lora": {"r": r, "lora_alpha": alpha, "lora_dropout": 0.0, "target_modules": "all-linear"},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")


@pytest.fixture(autouse=True)
def _one_cpu_thread() -> Iterator[None]:
    """Tiny models are dominated by per-op overhead; one thread avoids OpenMP spin-waits on a
    shared CPU (10-100x slower ops when other processes hold the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def expert_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("experts")
    base = make_base()
    return {
        name: write_expert(root / name, base, name, r, alpha, seed)
        for name, (r, alpha, seed) in EXPERT_SPECS.items()
    }


@pytest.fixture(scope="session")
def base_factory():  # type: ignore[no-untyped-def]
    """make_base(seed=0): a fresh copy of the same tiny Llama on every call."""
    return make_base


@pytest.fixture(scope="session")
def expert_specs() -> dict[str, tuple[int, int, int]]:
    return dict(EXPERT_SPECS)


@pytest.fixture(scope="session")
def expert_writer():  # type: ignore[no-untyped-def]
    return write_expert


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(5))
