"""The main job end to end on the smoke experiment: every stage, every system, every output."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PLOT_STEMS

REPO = Path(__file__).resolve().parents[1]
SETS = ["law", "code", "medical", "general", "two_domain"]
NOT_GENERATING = ("merge_cat", "xlora")  # left out of eval.generation.systems by smoke_run
COST = ("prefill_tokens_per_s", "decode_tokens_per_s", "ttft_ms", "peak_memory_mb", "weights_mb")


def _run(out: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(out), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [
            sys.executable,
            "scripts/run_pipeline.py",
            "experiment=smoke",
            f"hydra.run.dir={out}",
            f"paths.cache_dir={out}/cache",
            *overrides,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pipeline")
    files = tmp_path_factory.mktemp("extra")  # a benchmark of each kind, brought by config
    mc = [
        {"id": str(i), "domain": "law", "question": f"Is {i} odd?", "choices": ["yes", "no"],
         "answer": "no" if i % 2 == 0 else "yes"}
        for i in range(3)
    ]  # fmt: skip
    (files / "mc.jsonl").write_text("".join(json.dumps(q) + "\n" for q in mc))
    nll = {"id": "1", "domain": "medical", "instruction": "Define fever.", "response": "Heat."}
    (files / "nll.jsonl").write_text(json.dumps(nll) + "\n")
    extra = (
        f"eval.extra_sets=[{{name: extra_mc, path: {files}/mc.jsonl}},"
        f"{{name: extra_nll, path: {files}/nll.jsonl}}]"
    )
    generating = "eval.generation.systems=[base,expert_*,oracle,merge_ties,router,router_soft,"
    generating += "moelora,moelora_prior,moelora_prior_infer,moelora_prior_nobias,arrow]"
    proc = _run(out, "logger=wandb", "moelora.gate.temperature=0.5", extra, generating)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def test_pipeline_writes_every_output(smoke_run):
    for path in (
        "results.json",
        "results.csv",
        "report.md",
        "experts/adapters/law/manifest.json",
        "router/router",
        "moelora/moelora",
        "moelora_prior/moelora",
        "pipeline_steps.json",
        "xlora/xlora/xlora_classifier.safetensors",
        "xlora/xlora/manifest.json",
    ):
        assert (smoke_run / path).exists(), path
    assert {p.stem for p in (smoke_run / "plots").glob("*.png")} == PLOT_STEMS
    assert list((smoke_run / "wandb").glob("offline-run-*")), "W&B offline runs"


def test_results_name_the_exact_artifacts_evaluated(smoke_run):
    from loralab.io_utils import file_sha256
    from moelora import read_gate_metadata

    artifacts = json.loads((smoke_run / "results.json").read_text())["artifacts"]
    for domain in ("law", "code", "medical"):
        folder = smoke_run / "experts/adapters" / domain
        assert artifacts["adapters"][domain] == {
            "adapter_sha256": file_sha256(folder / "adapter_model.safetensors"),
            "adapter_config_sha256": file_sha256(folder / "adapter_config.json"),
        }
    router_json = json.loads((smoke_run / "router/router/router.json").read_text())
    assert artifacts["router"]["model_version"] == router_json["model_version"]
    gate = smoke_run / "moelora/moelora"
    assert artifacts["moelora_gate"]["gate_sha256"] == file_sha256(gate / "gate.safetensors")
    assert artifacts["moelora_gate"]["gate_sha256"] == read_gate_metadata(gate)["gate_sha256"]
    prior_gate = smoke_run / "moelora_prior/moelora"
    assert artifacts["moelora_prior_gate"]["gate_sha256"] == file_sha256(
        prior_gate / "gate.safetensors"
    )
    assert artifacts["moelora_prior_gate"] != artifacts["moelora_gate"]
    # the prior gate's training records were routed once by the evaluated router, cached
    priors = json.loads((smoke_run / "moelora_prior/router_priors.json").read_text())
    assert priors["model_version"] == router_json["model_version"] and priors["probs"]
    trained = json.loads((prior_gate / "training.json").read_text())["prior"]
    assert trained["router_model_version"] == router_json["model_version"]
    assert trained["pool"] == priors["pool"] == "segments"  # conf/moelora/quick_cpu.yaml
    classifier = smoke_run / "xlora/xlora/xlora_classifier.safetensors"
    assert artifacts["xlora_classifier"]["classifier_sha256"] == file_sha256(classifier)


def test_a_moelora_override_reached_the_gate(smoke_run):
    from moelora import read_gate_metadata

    assert read_gate_metadata(smoke_run / "moelora/moelora")["config"]["gate"]["temperature"] == 0.5


def test_every_system_has_every_metric(smoke_run):
    results = json.loads((smoke_run / "results.json").read_text())
    systems = results["systems"]
    assert systems == [
        "base",
        "expert_law",
        "expert_code",
        "expert_medical",
        "oracle",
        "merge_cat",
        "merge_ties",
        "router",
        "router_soft",
        "moelora",
        "moelora_prior",
        "moelora_prior_infer",
        "moelora_prior_nobias",
        "xlora",
        "arrow",
    ]
    have = {(m["system"], m["set"], m["metric"]) for m in results["metrics"]}
    for system in systems:
        for s in SETS:
            assert {(system, s, "nll"), (system, s, "ppl")} <= have, (system, s)
            if s != "general":  # oracle == base there: recovery undefined
                assert (system, s, "gap_recovery") in have
        for metric in COST:
            assert (system, "cost", metric) in have
        assert (system, "extra_nll", "nll") in have  # an extra set scored by NLL
        for s in ("pubmedqa", "legalbench_heldout", "extra_mc"):  # by option likelihood
            assert {(system, s, "accuracy"), (system, s, "accuracy_norm")} <= have, (system, s)
        if system in NOT_GENERATING:
            assert system not in results["generations"]
            assert not [k for k in have if k[0] == system and k[1].startswith("gen_")], system
            continue
        assert (system, "gen_code", "pass_rate") in have
        assert {(system, "gen_law", "rougeL"), (system, "gen_medical", "rougeL")} <= have
        replies = results["generations"][system]
        assert set(replies) == {"gen_code", "gen_law", "gen_medical", "humaneval"}
        assert (system, "humaneval", "pass_rate") in have
        assert all(isinstance(r["reply"], str) and 0 <= r["score"] <= 1 for r in replies["gen_law"])
    assert results["experiment"] == "smoke"
    # the router and the oracle reuse the single experts' results where they pick one
    by = {(m["system"], m["set"], m["metric"]): m["value"] for m in results["metrics"]}
    assert by[("oracle", "law", "nll")] == by[("expert_law", "law", "nll")]
    nll = {(m["system"], m["set"]): m for m in results["metrics"] if m["metric"] == "nll"}
    for (system, s), m in nll.items():
        assert m["ci_low"] <= m["value"] <= m["ci_high"], (system, s)
    # the oracle is the gold expert on single-domain sets and the better gold expert on pairs
    for d in ("law", "code", "medical"):
        assert nll["oracle", d]["value"] == pytest.approx(nll[f"expert_{d}", d]["value"])
    assert nll["oracle", "general"]["value"] == pytest.approx(nll["base", "general"]["value"])
    assert (
        nll["oracle", "two_domain"]["value"]
        <= min(nll[f"expert_{d}", "two_domain"]["value"] for d in ("law", "code", "medical")) + 1e-6
    )
    router = results["routing"]["router"]
    assert router["labels"] == ["law", "code", "medical", "base"] and len(router["confusion"]) == 4
    routed = [*SETS[:4], "extra_nll"]  # every single-domain request the router decided
    assert sum(map(sum, router["confusion"])) == sum(results["n_examples"][s] for s in routed)
    usage = results["routing"]["moelora"]["gate_usage"]
    assert set(usage) == {*SETS, "extra_nll"}
    for weights in usage.values():
        assert sum(weights.values()) == pytest.approx(1.0, abs=1e-4)
    assert set(results["paired_tests"]["router_vs_moelora"]) == {*SETS, "extra_nll"}
    assert set(results["paired_tests"]["router_vs_moelora_prior"]) == {*SETS, "extra_nll"}
    # the prior systems differ from one another and from MoE-LoRA (the prior and the gate count)
    prior_rows = ["moelora", "moelora_prior", "moelora_prior_infer", "moelora_prior_nobias"]
    assert len({nll[s, "two_domain"]["value"] for s in prior_rows}) == len(prior_rows)
    assert set(results["paired_tests_accuracy"]["router_vs_moelora"]) == {
        "pubmedqa", "legalbench_heldout", "extra_mc", "gen_code", "humaneval"
    }  # fmt: skip
    assert results["choice_sets"]["extra_mc"]["answers"] == [1, 0, 1]
    # the oracle picks the gold expert per question: its answers are that expert's
    picks = results["per_question"]
    assert picks["oracle"]["pubmedqa"] == picks["expert_medical"]["pubmedqa"]
    assert results["choice_sets"]["pubmedqa"]["n_questions"] == 3
    assert results["git_commit"] and results["versions"]["torch"]
    # one base model, measured as loralab.measurement defines it
    cost = {m["system"]: {} for m in results["metrics"] if m["set"] == "cost"}
    for m in results["metrics"]:
        if m["set"] == "cost":
            cost[m["system"]][m["metric"]] = m["value"]
    for system, values in cost.items():  # absolute: the weights the system runs on, and more
        assert values["peak_memory_mb"] > values["weights_mb"] > 0, system
    assert cost["moelora"]["weights_mb"] >= cost["expert_law"]["weights_mb"]  # + the gate
    measurement = results["measurement"]
    assert measurement["repeats"] >= 3 and measurement["threads"] >= 1
    held = measurement["allocated_before_systems_mb"]  # the shared base, data, tokenizer
    assert all(values["peak_memory_mb"] > held for values in cost.values())
    assert set(results["seconds"]) == {"routed", "merge_ties", "xlora", "arrow"}
    assert all("choices" in stages for stages in results["seconds"].values())
    assert (
        "generate" in results["seconds"]["arrow"] and "generate" not in results["seconds"]["xlora"]
    )
    assert results["peak_rss_mb"] > 0
    rows = (smoke_run / "results.csv").read_text().splitlines()
    assert (
        rows[0] == "system,set,metric,value,ci_low,ci_high"
        and len(rows) == len(results["metrics"]) + 1
    )


def test_each_gated_system_is_scored_with_its_own_gate(smoke_run, tmp_path, monkeypatch):
    """NLL rows and option rows alike: the gate in the model is the system's own, whichever
    system ran before it (moelora_prior_nobias leaves the prior-trained gate in)."""
    from loralab.evaluation import build, scoring
    from loralab.evaluation.harness import evaluate
    from tests.conftest import compose

    banks, seen = [], []
    real_init, real_score = build.GateBank.__init__, scoring.RoutedScorer.score

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        banks.append(self)

    def score(self, system, *args, **kwargs):
        seen.append((system.name, banks[-1].active))
        return real_score(self, system, *args, **kwargs)

    monkeypatch.setattr(build.GateBank, "__init__", init)
    monkeypatch.setattr(scoring.RoutedScorer, "score", score)
    systems = ["moelora", "moelora_prior_infer", "moelora_prior", "moelora_prior_nobias"]
    cfg = compose(
        "evaluate",
        ["experiment=smoke", f"eval.systems=[{','.join(systems)}]", "eval.generation.per_set=0",
         "eval.generation.mbpp=0", "eval.cost.enabled=false"],
        tmp_path,
    )  # fmt: skip
    evaluate(
        cfg,
        smoke_run / "experts/adapters",
        smoke_run / "router/router",
        smoke_run / "moelora/moelora",
        moelora_prior_dir=smoke_run / "moelora_prior/moelora",
    )
    gates = {"moelora": "moelora", "moelora_prior_infer": "moelora"}
    assert seen == [(n, gates.get(n, "moelora_prior")) for n in systems] * 2  # NLL, then options


def test_notebook_runs_on_the_smoke_results(smoke_run, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("LORALAB_RUN_DIR", str(smoke_run))
    nb = nbformat.read(REPO / "notebooks" / "compare.ipynb", as_version=4)
    NotebookClient(nb, timeout=180, kernel_name="python3").execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert len([o for o in outputs if "image/png" in o.get("data", {})]) >= 4


def test_readme_notebook_command_as_written(smoke_run, tmp_path):
    """`LORALAB_RUN_DIR=outputs/run_pipeline/<experiment> jupyter execute notebooks/compare.ipynb
    --output=...` from the repository root, the run dir relative (the kernel runs in notebooks/)."""
    import nbformat

    name = f"pytest-notebook-{os.getpid()}"
    link = REPO / "outputs" / "run_pipeline" / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(smoke_run, target_is_directory=True)
    executed = tmp_path / "compare.ipynb"
    try:
        proc = subprocess.run(
            [
                str(Path(sys.executable).parent / "jupyter"),
                "execute",
                "notebooks/compare.ipynb",
                f"--output={executed}",
            ],
            cwd=REPO,
            env={**os.environ, "LORALAB_RUN_DIR": f"outputs/run_pipeline/{name}"},
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        link.unlink()
    assert proc.returncode == 0, proc.stderr[-3000:]
    nb = nbformat.read(executed, as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert len([o for o in outputs if "image/png" in o.get("data", {})]) >= 4
    assert f"outputs/run_pipeline/{name}" in "".join(o.get("text", "") for o in outputs)


def test_rerun_reuses_every_artifact(smoke_run):
    artifacts = [
        smoke_run / "experts/adapters/code/adapter_model.safetensors",
        *(smoke_run / "xlora/xlora").iterdir(),
        *(smoke_run / "router/router").iterdir(),
        *(smoke_run / "moelora/moelora").iterdir(),
        *(smoke_run / "moelora_prior/moelora").iterdir(),
    ]
    before = {p: p.stat().st_mtime_ns for p in artifacts}
    proc = _run(smoke_run, "pipeline.stages=[experts,router,moelora,moelora_prior,xlora]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in artifacts} == before
    steps = json.loads((smoke_run / "pipeline_steps.json").read_text())["runs"][-1]["steps"]
    assert (
        steps["experts"]["reused"] == ["law", "code", "medical"] and not steps["experts"]["trained"]
    )
    for stage in ("router", "moelora", "moelora_prior", "xlora"):
        assert steps[stage]["action"] == "reused", stage


def test_a_system_whose_stage_is_left_out_stops_the_main_job_before_training(tmp_path):
    out = tmp_path / "run"
    proc = _run(out, "pipeline.stages=[experts,router,moelora,xlora,evaluate]")
    assert proc.returncode != 0
    assert (
        "eval.systems: 'moelora_prior' needs the 'moelora_prior' artifacts, which pipeline.stages"
        in proc.stderr
    )
    assert not (out / "experts").exists()


def test_a_bad_extra_set_stops_the_main_job_before_training(tmp_path):
    bad = tmp_path / "bench.jsonl"
    bad.write_text(
        '{"id": "1", "domain": "law", "question": "Q?", "choices": ["A"], "answer": 0}\n'
    )
    out = tmp_path / "run"
    proc = _run(out, f"eval.extra_sets=[{{name: mine, path: {bad}}}]")
    assert proc.returncode != 0
    assert f"{bad}:1: field 'choices' must be a list of >= 2 distinct" in proc.stderr
    assert not (out / "experts").exists()


def test_a_router_that_no_longer_loads_and_a_gate_of_another_router_prior_are_retrained(
    smoke_run, tmp_path
):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    config_file = run / "router/router/router.json"
    config = json.loads(config_file.read_text())
    version = config["model_version"]
    config["encoder"]["fingerprint"]["encode"] = "per_text"  # not how this encoder encodes
    config_file.write_text(json.dumps(config))
    training_file = run / "moelora_prior/moelora/training.json"
    training = json.loads(training_file.read_text())
    training["prior"]["router_model_version"] = "0" * 12  # trained with another router's prior
    training_file.write_text(json.dumps(training))
    gate = run / "moelora/moelora/gate.safetensors"
    before = gate.stat().st_mtime_ns
    proc = _run(run, "pipeline.stages=[experts,router,moelora,moelora_prior,xlora]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "encode: saved 'per_text', now None" in (run / "run_pipeline.log").read_text()
    steps = json.loads((run / "pipeline_steps.json").read_text())["runs"][-1]["steps"]
    actions = {s: steps[s]["action"] for s in ("router", "moelora", "moelora_prior", "xlora")}
    assert actions == {
        "router": "trained", "moelora": "reused", "moelora_prior": "trained", "xlora": "reused"
    }  # fmt: skip
    assert gate.stat().st_mtime_ns == before
    saved = json.loads(config_file.read_text())
    assert "encode" not in saved["encoder"]["fingerprint"]
    training = json.loads(training_file.read_text())
    assert training["prior"]["router_model_version"] == saved["model_version"]
    assert version == saved["model_version"]  # same data, same encoder: the same router again
