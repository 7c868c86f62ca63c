"""Reading, validating and splitting the domain instruction / response files.

Every record is one JSON object per line with the fields of ``REQUIRED_FIELDS``. The split of a
record into train / val / test is a pure function of its ``id`` (a SHA-256 hash), so every part of
the project (experts, router, MoE-LoRA gate, evaluation) sees the same split without sharing state,
and the test split is never trained on. ``load_domain_split(data_cfg, domain, split)`` reads one
domain's split as a config describes it (every stage and the evaluation use it).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from loralab.io_utils import file_sha256

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")
BASE_LABEL = "base"  # the router's label for "no expert" (general.jsonl and every abstention)
GENERAL = "general"  # the data.files key of the general (no expert) records
REQUIRED_FIELDS: tuple[str, ...] = ("id", "domain", "instruction", "response")


class DataFormatError(ValueError):
    """A data file or record is malformed; the message names the file, line and field."""


@dataclass(frozen=True)
class Record:
    """One instruction / response pair. ``domain`` is one of ``data.domains`` or ``general``."""

    id: str
    domain: str
    instruction: str
    response: str
    source: str = ""
    license: str = ""


def router_labels(domains: Sequence[str]) -> list[str]:
    """The request router's labels: each expert's domain, then ``base``."""
    if BASE_LABEL in domains or GENERAL in domains:
        raise ValueError(
            f"data.domains {list(domains)}: {BASE_LABEL!r} and {GENERAL!r} are reserved"
        )
    if len(set(domains)) != len(domains) or not domains:
        raise ValueError(f"data.domains {list(domains)}: need one or more distinct names")
    return [*domains, BASE_LABEL]


def default_data_root() -> Path:
    """``$LORALAB_DATA`` if set, else ``../shared/data`` beside the repository (the lab default)."""
    env = os.environ.get("LORALAB_DATA")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[3]
    return repo.parent / "shared" / "data"


def json_objects(
    lines: Iterable[str], source: str | Path, error: type[ValueError] = DataFormatError
) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line of a JSON-lines text; a line that is not a
    JSON object raises ``error`` naming ``<source>:<line>``."""
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{source}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise error(f"{source}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def read_records(path: str | Path, expected_domain: str | None = None) -> list[Record]:
    """Read and validate a JSON-lines file of records.

    Raises:
        FileNotFoundError: the file does not exist.
        DataFormatError: a line is not JSON, a required field is missing / not a non-empty string,
            the domain differs from ``expected_domain``, or an id repeats. The message reads
            ``<file>:<line>: field '<name>' ...``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    records: list[Record] = []
    seen: dict[str, int] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, obj in json_objects(f, path):
            for field in REQUIRED_FIELDS:
                value = obj.get(field)
                if field not in obj:
                    raise DataFormatError(f"{path}:{lineno}: field '{field}' is missing")
                if not isinstance(value, str) or not value.strip():
                    raise DataFormatError(
                        f"{path}:{lineno}: field '{field}' must be a non-empty string, got {value!r:.60}"
                    )
            if expected_domain is not None and obj["domain"] != expected_domain:
                raise DataFormatError(
                    f"{path}:{lineno}: field 'domain' is {obj['domain']!r}, expected {expected_domain!r}"
                )
            if obj["id"] in seen:
                raise DataFormatError(
                    f"{path}:{lineno}: field 'id' {obj['id']!r} repeats line {seen[obj['id']]}"
                )
            seen[obj["id"]] = lineno
            records.append(
                Record(
                    id=obj["id"],
                    domain=obj["domain"],
                    instruction=obj["instruction"],
                    response=obj["response"],
                    source=str(obj.get("source", "")),
                    license=str(obj.get("license", "")),
                )
            )
    if not records:
        raise DataFormatError(f"{path}: no records")
    return records


def split_of(record_id: str, val_fraction: float = 0.05, test_fraction: float = 0.05) -> Split:
    """Deterministic split of a record from a SHA-256 hash of its id (uniform in [0, 1))."""
    if not (val_fraction >= 0 and test_fraction >= 0 and val_fraction + test_fraction < 1):
        raise ValueError(f"bad split fractions: val={val_fraction}, test={test_fraction}")
    digest = hashlib.sha256(record_id.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def select_split(
    records: Iterable[Record],
    split: Split,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    limit: int | None = None,
) -> list[Record]:
    """Records of one split, in file order, at most ``limit`` of them (spread over the file)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    chosen = [r for r in records if split_of(r.id, val_fraction, test_fraction) == split]
    return spread_subset(chosen, limit)


def spread_subset(items: Sequence[Record], limit: int | None) -> list[Record]:
    """``limit`` items evenly spaced over ``items`` (files are grouped by source, so a prefix
    would see one source only). ``None`` or a limit >= len keeps everything."""
    if limit is None or limit >= len(items):
        return list(items)
    if limit <= 0:
        return []
    step = len(items) / limit
    return [items[int(i * step)] for i in range(limit)]


# ----------------------------------------------------------------------------- from config


def data_root(data_cfg: Mapping[str, Any]) -> Path:
    root = data_cfg.get("root")
    return Path(root) if root else default_data_root()


def domain_file(data_cfg: Mapping[str, Any], domain: str) -> Path:
    files = data_cfg["files"]
    if domain not in files:
        raise KeyError(f"data.files has no entry for domain {domain!r} (known: {sorted(files)})")
    return data_root(data_cfg) / str(files[domain])


def split_cap(data_cfg: Mapping[str, Any], split: Split) -> int | None:
    cap = data_cfg.get(f"max_{split}_per_domain")
    return None if cap is None else int(cap)


def load_domain_split(
    data_cfg: Mapping[str, Any], domain: str, split: Split, limit: int | None = -1
) -> list[Record]:
    """Records of ``domain`` in ``split``; ``limit=-1`` uses the config's cap for that split."""
    records = read_records(domain_file(data_cfg, domain), expected_domain=domain)
    return select_split(
        records,
        split,
        val_fraction=float(data_cfg["val_fraction"]),
        test_fraction=float(data_cfg["test_fraction"]),
        limit=split_cap(data_cfg, split) if limit == -1 else limit,
    )


def data_file_hashes(data_cfg: Mapping[str, Any], domains: Sequence[str]) -> dict[str, str]:
    return {
        str(domain_file(data_cfg, d).name): file_sha256(domain_file(data_cfg, d)) for d in domains
    }
