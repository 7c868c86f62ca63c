"""Save / load: identical decisions after a round trip, clear errors for bad folders or encoders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests_router_helpers import QUESTIONS

from router import EncoderMismatchError, EncoderSpec, HashingEncoder, Router, RouterFileError
from router.persistence import CONFIG_FILE, TENSORS_FILE

REQUESTS = [
    *QUESTIONS.values(),
    "",
    3,
    "court patient python holiday",
    [{"role": "assistant", "content": "x"}],
]


@pytest.fixture
def saved(toy_router: Router, tmp_path: Path) -> Path:
    toy_router.save(tmp_path / "router", extra={"note": "test"})
    return tmp_path / "router"


def _rows(router: Router) -> list[tuple]:
    return [
        (d.label, d.reason, d.probs, d.margin, d.ood_score) for d in router.route_batch(REQUESTS)
    ]


def test_round_trip_gives_identical_decisions(toy_router: Router, saved: Path) -> None:
    loaded = Router.load(saved)  # encoder rebuilt from the stored spec
    assert _rows(loaded) == _rows(toy_router)
    assert loaded.labels == toy_router.labels
    assert loaded.temperature == toy_router.temperature
    assert loaded.thresholds == toy_router.thresholds
    assert loaded.policy == toy_router.policy
    assert loaded.descriptions == toy_router.descriptions
    assert loaded.model_version == toy_router.model_version != "unsaved"
    assert all(d.model_version == loaded.model_version for d in loaded.route_batch(REQUESTS))


def test_saved_files_are_json_and_safetensors_only(saved: Path) -> None:
    assert sorted(p.name for p in saved.iterdir()) == [CONFIG_FILE, TENSORS_FILE]
    config = json.loads((saved / CONFIG_FILE).read_text())
    assert config["format"] == "loralab-router" and config["format_version"] == 1
    assert config["encoder"]["fingerprint"]["dim"] == 256
    assert config["extra"] == {"note": "test"}


def test_save_replaces_an_existing_router_atomically(toy_router: Router, saved: Path) -> None:
    (saved / "stale.txt").write_text("old")
    toy_router.save(saved)
    assert not (saved / "stale.txt").exists()
    assert not [p for p in saved.parent.iterdir() if p.name.startswith(".")]


def test_missing_folder_or_file(tmp_path: Path, saved: Path) -> None:
    with pytest.raises(RouterFileError, match="not found"):
        Router.load(tmp_path / "nope")
    (saved / TENSORS_FILE).unlink()
    with pytest.raises(RouterFileError, match=f"missing {TENSORS_FILE}"):
        Router.load(saved)


def test_corrupt_json(saved: Path) -> None:
    (saved / CONFIG_FILE).write_text("{not json")
    with pytest.raises(RouterFileError, match="not valid JSON"):
        Router.load(saved)


def test_other_format_version(saved: Path) -> None:
    config = json.loads((saved / CONFIG_FILE).read_text())
    config["format_version"] = 99
    (saved / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(RouterFileError, match="format_version 99"):
        Router.load(saved)


def test_tampered_tensors(saved: Path) -> None:
    data = bytearray((saved / TENSORS_FILE).read_bytes())
    data[-1] ^= 0xFF
    (saved / TENSORS_FILE).write_bytes(bytes(data))
    with pytest.raises(RouterFileError, match="SHA-256 differs"):
        Router.load(saved)


def test_truncated_tensors_with_matching_hash(saved: Path) -> None:
    import hashlib

    (saved / TENSORS_FILE).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    config = json.loads((saved / CONFIG_FILE).read_text())
    config["tensors_sha256"] = hashlib.sha256((saved / TENSORS_FILE).read_bytes()).hexdigest()
    (saved / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(RouterFileError):
        Router.load(saved)


def test_different_encoder_dim_is_refused(saved: Path) -> None:
    other = HashingEncoder(EncoderSpec(kind="hashing", name="hashing", dim=128))
    with pytest.raises(EncoderMismatchError, match="dim: saved 256, now 128"):
        Router.load(saved, encoder=other)


class _ShiftedEncoder(HashingEncoder):
    """Same fingerprint as the hashing encoder, different embeddings."""

    def _bucket(self, token: str) -> tuple[int, float]:
        j, sign = super()._bucket(token + "!")
        return j, sign


def test_same_fingerprint_but_different_embeddings_is_refused(saved: Path) -> None:
    with pytest.raises(EncoderMismatchError, match="probe embeddings differ"):
        Router.load(saved, encoder=_ShiftedEncoder())


def test_config_whose_parts_disagree_is_a_router_file_error(saved: Path) -> None:
    config = json.loads((saved / CONFIG_FILE).read_text())
    config["base_label"] = "finance"
    (saved / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(RouterFileError, match=r"inconsistent router files.*'finance'"):
        Router.load(saved)
