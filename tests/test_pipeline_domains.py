"""A fourth domain added to a finished smoke run: only its expert trains, the router is refit on
cached embeddings (only the new label's texts encoded), the gate grows with its old rows kept."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loralab.data.records import default_data_root
from loralab.io_utils import file_sha256

REPO = Path(__file__).resolve().parents[1]
OLD = ["law", "code", "medical"]
NEW = "trivia"
# eval: the routed systems only, no generation / cost: the point is what depends on the domains
EVAL = (
    "eval.systems=[base,expert_*,oracle,router,moelora,moelora_prior]",
    "eval.generation.per_set=0",
    "eval.cost.enabled=false",
)

pytestmark = pytest.mark.skipif(
    not default_data_root().is_dir(), reason="shared data folder not present"
)


def _run(out: Path, root: Path, *overrides: str) -> None:
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/run_pipeline.py",
            "experiment=smoke",
            f"hydra.run.dir={out}",
            f"paths.cache_dir={out}/cache",
            f"data.root={root}",
            "logger=csv",
            *overrides,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


def _data_root(tmp: Path) -> Path:
    """The shared files plus ``trivia.jsonl``: every 25th general record, relabelled."""
    shared, root = default_data_root(), tmp / "data"
    root.mkdir()
    for name in ("law.jsonl", "code.jsonl", "medical.jsonl", "general.jsonl", "eval"):
        (root / name).symlink_to(shared / name)
    with (shared / "general.jsonl").open() as f, (root / f"{NEW}.jsonl").open("w") as g:
        for i, line in enumerate(f):
            if i % 25 == 0:
                r = json.loads(line)
                g.write(json.dumps({**r, "id": f"{NEW}-{r['id']}", "domain": NEW}) + "\n")
    return root


def _gate_rows(gate: dict[str, torch.Tensor], slots: list[str]) -> dict[str, torch.Tensor]:
    """``{'<weight key>/<slot>': row}`` of the slot-indexed gate weights (rows = slots)."""
    return {
        f"{k}/{slot}": v[i]
        for k, v in gate.items()
        if k.endswith(("proj.weight", "proj.bias")) and v.shape[0] == len(slots)
        for i, slot in enumerate(slots)
    }


def test_a_fourth_domain_trains_only_its_expert_and_grows_the_gate(tmp_path: Path) -> None:
    root, out = _data_root(tmp_path), tmp_path / "run"
    _run(out, root, "pipeline.stages=[experts,router,moelora,moelora_prior]")
    adapters = {d: out / "experts/adapters" / d / "adapter_model.safetensors" for d in OLD}
    before = {d: (file_sha256(p), p.stat().st_mtime_ns) for d, p in adapters.items()}
    old_gate = tmp_path / "old_gate"
    shutil.copytree(out / "moelora/moelora", old_gate)

    _run(
        out,
        root,
        f"data.domains=[{','.join([*OLD, NEW])}]",
        f"+data.files.{NEW}={NEW}.jsonl",
        "pipeline.stages=[experts,router,moelora,moelora_prior,evaluate]",
        "pipeline.grow_gate_steps=2",
        "moelora.optim.lr=0.0",  # the grown gate's old rows must then be exactly the old gate's
        *EVAL,
    )
    runs = json.loads((out / "pipeline_steps.json").read_text())["runs"]
    assert [r["domains"] for r in runs] == [OLD, [*OLD, NEW]]
    first, second = runs[0]["steps"], runs[1]["steps"]
    assert first["experts"]["trained"] == OLD and first["router"]["action"] == "trained"
    assert first["moelora"]["action"] == first["moelora_prior"]["action"] == "trained"
    for step in (*first.values(), *second.values()):
        assert step["seconds"] >= 0

    # experts: only the new one trained; the old ones verified and untouched
    assert second["experts"]["trained"] == [NEW] and second["experts"]["reused"] == OLD
    assert {d: (file_sha256(p), p.stat().st_mtime_ns) for d, p in adapters.items()} == before
    # router: refit with the new label; only its texts encoded, the rest from the cache
    router = second["router"]
    assert router["action"] == "refit" and router["labels"] == [*OLD, NEW, "base"]
    assert router["encoded_texts"][NEW] > 0
    assert all(router["encoded_texts"][label] == 0 for label in [*OLD, "base"])
    saved = json.loads((out / "router/router/router.json").read_text())
    assert saved["labels"] == [*OLD, NEW, "base"]
    # gate: grown over four experts, trained a few steps, old rows (and "none") kept
    assert second["moelora"]["action"] == "grown" and second["moelora"]["kept_experts"] == OLD
    assert second["moelora"]["global_step"] == 2
    meta = json.loads((out / "moelora/moelora/moelora.json").read_text())
    assert [e["name"] for e in meta["experts"]] == [*OLD, NEW]
    old = _gate_rows(load_file(old_gate / "gate.safetensors"), [*OLD, "none"])
    new = _gate_rows(load_file(out / "moelora/moelora/gate.safetensors"), [*OLD, NEW, "none"])
    assert old and set(old) < set(new)
    for key, row in old.items():
        assert torch.equal(new[key], row), key
    assert any(new[k].abs().sum() > 0 for k in new if k.endswith(f"/{NEW}"))
    prior = second["moelora_prior"]  # the gate trained with the router prior grows the same way
    assert prior["action"] == "grown" and prior["kept_experts"] == OLD
    prior_meta = json.loads((out / "moelora_prior/moelora/moelora.json").read_text())
    assert [e["name"] for e in prior_meta["experts"]] == [*OLD, NEW]

    # evaluation: the new expert is a system, its test split a set, its pairs in two_domain
    results = json.loads((out / "results.json").read_text())
    assert results["domains"] == [*OLD, NEW]
    assert results["systems"] == ["base", *(f"expert_{d}" for d in [*OLD, NEW]), "oracle",
                                  "router", "moelora", "moelora_prior"]  # fmt: skip
    assert results["sets"] == [*OLD, NEW, "general", "two_domain"]
    assert results["n_examples"]["two_domain"] == 6 * 2  # 4 choose 2 pairs x per_pair
    assert results["routing"]["router"]["labels"] == [*OLD, NEW, "base"]
    assert len(results["routing"]["router"]["confusion"]) == 5
    assert set(results["routing"]["moelora"]["experts"]) >= {*OLD, NEW}
    nll = {(m["system"], m["set"]) for m in results["metrics"] if m["metric"] == "nll"}
    assert ("expert_trivia", "trivia") in nll and ("oracle", "two_domain") in nll
    assert second["evaluate"]["systems"] == results["systems"]
