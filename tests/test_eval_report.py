"""results.json / results.csv, report.md + plots, W&B offline logging and the notebook, from a
synthetic but realistic results dict (the harness's schema, every system, set and metric)."""

from __future__ import annotations

import copy
import csv
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from loralab.evaluation.options import paired_rate_tests, rate_metrics
from loralab.evaluation.report import validate_results, write_report, write_results
from loralab.evaluation.stats import gap_recovery_metrics, nll_metrics, paired_tests
from tests.conftest import PLOT_STEMS

DOMAINS = ("law", "code", "medical")
SYSTEMS = (
    "base",
    *(f"expert_{d}" for d in DOMAINS),
    "oracle",
    "merge_cat",
    "merge_ties",
    "router",
    "router_soft",
    "moelora",
    "xlora",
    "arrow",
)
SETS = (*DOMAINS, "general", "two_domain")
GENERATION = (("gen_code", "pass_rate"), ("gen_law", "rougeL"), ("gen_medical", "rougeL"))
CHOICE_SETS = ("pubmedqa", "legalbench_heldout")
TWO_DOMAIN_TEXT = "Explain habeas corpus . Then write def add ( a , b ) : return a + b"
NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "compare.ipynb"


def _per_token_nll(system: str, set_name: str) -> float:
    """A plausible mean NLL: experts help their own domain, mixtures land between."""
    gold = set_name if set_name in DOMAINS else None
    if system == "base":
        return 2.0
    if set_name == "general":  # no expert for it: the oracle is the base model, adapters hurt a bit
        return 2.0 if system == "oracle" else 2.03
    if system == "oracle" and set_name == "two_domain":  # each part's expert
        return 1.6
    if system == "oracle" or system == f"expert_{gold}":
        return 1.5
    if system.startswith("expert_"):
        return 1.95
    return {
        "merge_cat": 1.8,
        "merge_ties": 1.85,
        "router": 1.55,
        "router_soft": 1.6,
        "moelora": 1.58,
        "xlora": 1.7,
        "arrow": 1.75,
    }[system] + (set_name == "two_domain") * (0.1 if system.startswith("router") else 0.0)


def _entry(system: str, set_name: str, metric: str, value: float) -> dict:
    return {
        "system": system,
        "set": set_name,
        "metric": metric,
        "value": value,
        "ci_low": None,
        "ci_high": None,
    }


def make_results(n_examples: int = 40, seed: int = 0) -> dict:
    """Every system x set x metric of the schema, with per-example NLLs the metrics come from."""
    rng = np.random.default_rng(seed)
    per_example: dict = {s: {} for s in SYSTEMS}
    metrics: list[dict] = []
    for set_name in SETS:
        tokens = rng.integers(20, 200, n_examples)
        difficulty = rng.normal(0.0, 0.3, n_examples)  # shared by all systems: paired data
        for system in SYSTEMS:
            noise = rng.normal(0.0, 0.05, n_examples)
            sums = (_per_token_nll(system, set_name) + difficulty + noise) * tokens
            if system == "oracle" and set_name == "general":  # gold class base: the base model
                sums = np.asarray(per_example["base"]["general"]["nll_sum"])
            per_example[system][set_name] = {"nll_sum": sums.tolist(), "n_tokens": tokens.tolist()}
            metrics += nll_metrics(system, set_name, sums, tokens, n_boot=200)
    metrics += gap_recovery_metrics(metrics)
    rates: dict = {s: {} for s in SYSTEMS}  # 0/1 per question: accuracy and the paired tests
    for set_name in CHOICE_SETS:
        easy = rng.random(n_examples)  # shared by all systems: paired data
        for i, system in enumerate(SYSTEMS):
            right = (easy < 0.4 + 0.02 * i).astype(int).tolist()
            rates[system][set_name] = right
            metrics += rate_metrics(
                system, set_name, {"accuracy": right, "accuracy_norm": right}, 200, 0, 0.05
            )
    for i, system in enumerate(SYSTEMS):
        for set_name, metric in GENERATION:
            metrics.append(_entry(system, set_name, metric, 0.2 + 0.02 * i))
        cost = {
            "prefill_tokens_per_s": 2000.0 - 50 * i,
            "decode_tokens_per_s": 40.0 - 2 * i,  # base fastest, arrow slowest
            "ttft_ms": 30.0 + i,
            "peak_memory_mb": 600.0 + 10 * i,
            "weights_mb": 520.0 + i,
        }
        metrics += [_entry(system, "cost", m, v) for m, v in cost.items()]
    labels = ["law", "code", "medical", "base"]
    confusion = [[18, 1, 1, 0], [0, 19, 0, 1], [2, 0, 17, 1], [1, 1, 0, 18]]
    tokens = TWO_DOMAIN_TEXT.split()
    weights = rng.dirichlet([1.0, 1.0, 1.0], len(tokens))
    return {
        "experiment": "synthetic",
        "created": "2026-01-01T00:00:00+00:00",
        "git_commit": "0123abcd",
        "versions": {"torch": "2.x", "peft": "0.x"},
        "device": "cpu (test fixture)",
        "config": {"eval": {"systems": list(SYSTEMS)}, "seed": seed},
        "measurement": {
            "clock": "wall (time.perf_counter), median of the timed calls",
            "repeats": 3,
            "threads": 2,
            "peak_memory": "glibc mallinfo2 in-use bytes (uordblks + hblkhd), sampled every 1 ms",
            "weights": "bytes of parameters and buffers, unique storages",
            "batch_size": 4,
            "prompt_tokens": 64,
            "new_tokens": 12,
            "allocated_before_systems_mb": 612.5,
        },
        "domains": list(DOMAINS),
        "systems": list(SYSTEMS),
        "sets": list(SETS),
        "metrics": metrics,
        "per_example": per_example,
        "paired_tests": {
            "router_vs_moelora": paired_tests(per_example, "router", "moelora", n_boot=200)
        },
        "choice_sets": {t: {"n_questions": n_examples} for t in CHOICE_SETS},
        "paired_tests_accuracy": {
            "router_vs_moelora": paired_rate_tests(rates, "router", "moelora", 200, 0, 0.05)
        },
        "routing": {
            "router": {
                "labels": labels,
                "accuracy": 72 / 80,
                "confusion": confusion,
                "per_set_accuracy": {"law": 0.9, "code": 0.95, "medical": 0.85, "general": 0.9},
            },
            "moelora": {
                "experts": list(DOMAINS),
                "gate_usage": {d: {e: (0.6 if e == d else 0.2) for e in DOMAINS} for d in SETS},
                "heatmaps": [
                    {"tokens": tokens, "weights": weights.tolist(), "domains": ["law", "code"]}
                ]
                * 2,
            },
        },
    }


@pytest.fixture(scope="module")
def results() -> dict:
    return make_results()


def test_write_results_json_and_csv(results: dict, tmp_path: Path) -> None:
    results = copy.deepcopy(results)
    results["metrics"].append(_entry("arrow", "cost", "odd", float("nan")))
    results["per_example"]["base"]["law"]["n_tokens"] = np.array([3, 4])  # numpy survives too
    json_path, csv_path = write_results(results, tmp_path)
    assert (json_path, csv_path) == (tmp_path / "results.json", tmp_path / "results.csv")
    loaded = json.loads(json_path.read_text(), parse_constant=pytest.fail)  # strict: no NaN
    assert loaded["metrics"][-1]["value"] is None
    assert loaded["per_example"]["base"]["law"]["n_tokens"] == [3, 4]
    assert loaded["systems"] == list(SYSTEMS)
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["system", "set", "metric", "value", "ci_low", "ci_high"]
    assert len(rows) == len(results["metrics"])
    first = results["metrics"][0]
    assert rows[0]["system"] == first["system"] and rows[0]["metric"] == "nll"
    assert float(rows[0]["value"]) == pytest.approx(first["value"])
    assert float(rows[0]["ci_low"]) == pytest.approx(first["ci_low"])
    assert rows[-1]["value"] == "" and rows[-1]["ci_low"] == ""
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_write_report_draws_every_plot(results: dict, tmp_path: Path) -> None:
    paths = write_report(results, tmp_path)
    assert paths[0] == tmp_path / "report.md"
    pngs = {p.stem for p in paths[1:]}
    assert pngs == PLOT_STEMS
    for p in paths[1:]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert p.stat().st_size > 5000
    text = paths[0].read_text()
    assert "Skipped" not in text
    for stem in PLOT_STEMS:
        assert f"](plots/{stem}.png)" in text
    nll = next(m for m in results["metrics"] if m["system"] == "router" and m["metric"] == "nll")
    assert f"| router | {nll['value']:.3f} [{nll['ci_low']:.3f}, {nll['ci_high']:.3f}]" in text
    test = results["paired_tests"]["router_vs_moelora"]["two_domain"]
    assert f"| two_domain | {test['diff']:.3f} |" in text
    assert "| **medical** | 2 | 0 | 17 | 1 |" in text  # confusion row
    assert "Accuracy on the single-domain sets: 0.900" in text
    assert (
        "| system | prefill_tokens_per_s | decode_tokens_per_s | ttft_ms | peak_memory_mb "
        "| weights_mb |" in text
    )
    assert "| arrow | 1450.0 | 18.0 | 41.0 | 710.0 | 531.0 |" in text
    assert "Batch 4, prompts of 64 tokens, 12 new tokens" in text
    assert "3 timed calls after a warm-up, 2 torch thread(s)" in text
    assert "the process held 612.5 MiB" in text
    assert "gen_code pass_rate" in text and "gen_law rougeL" in text
    acc = next(
        m for m in results["metrics"] if m["system"] == "router" and m["metric"] == "accuracy"
    )
    assert f"| router | {acc['value']:.3f} [{acc['ci_low']:.3f}, {acc['ci_high']:.3f}]" in text
    assert "Questions: pubmedqa 40, legalbench_heldout 40" in text
    diff = results["paired_tests_accuracy"]["router_vs_moelora"]["pubmedqa"]
    assert "## Paired test: router − moelora (accuracy / pass-rate difference)" in text
    assert f"| pubmedqa | {diff['diff']:.3f} |" in text


def test_report_skips_absent_plots_and_says_so(results: dict, tmp_path: Path) -> None:
    minimal = {k: results[k] for k in ("systems", "sets")}
    minimal["metrics"] = [m for m in results["metrics"] if m["metric"] in ("nll", "ppl")]
    paths = write_report(minimal, tmp_path)
    assert [p.name for p in paths] == ["report.md", "nll_by_set.png"]
    text = paths[0].read_text()
    assert text.count("_Skipped:") == len(PLOT_STEMS) - 1
    assert "_Skipped: no `routing.router.confusion` in the results._" in text


def test_report_leaves_out_sections_a_run_has_no_data_for(results: dict) -> None:
    """A generation-only run (no NLL or choice sets, nothing routed for the router table) gets no
    empty paired-test tables and no router section."""
    from loralab.evaluation.plots import PLOTS
    from loralab.evaluation.report import render_report
    from loralab.evaluation.routing_plots import plot_router_confusion

    gen_only = {k: results[k] for k in ("systems", "sets")}
    gen_only["metrics"] = [m for m in results["metrics"] if m["metric"] == "pass_rate"]
    gen_only["paired_tests"] = {"router_vs_moelora": {}}
    rates = results["paired_tests_accuracy"]["router_vs_moelora"]
    gen_only["paired_tests_accuracy"] = {"router_vs_moelora": {"gen_code": rates["pubmedqa"]}}
    gen_only["routing"] = {
        "router": {"accuracy": None, "labels": ["law", "base"], "confusion": [[0, 0], [0, 0]]}
    }
    text = render_report(gen_only, {}, {stem: PLOTS[stem][2] for stem in PLOTS}, Path("."))
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert not [h for h in headings if h.startswith("## Paired bootstrap")]
    assert "## Router" not in headings
    assert text.count("## Paired test: router − moelora (accuracy / pass-rate difference)") == 1
    assert "| gen_code |" in text
    assert "## Generation (greedy; pass_rate = pass@1" in text
    assert plot_router_confusion(gen_only) is None  # an all-zero confusion is not drawn


def test_pareto_plot_marks_the_front(results: dict) -> None:
    from loralab.evaluation.plots import mean_domain_nll, plot_pareto

    nll = mean_domain_nll(results)
    assert set(nll) == set(SYSTEMS)
    assert nll["oracle"] == pytest.approx(1.5, abs=0.15)
    ax = plot_pareto(results).axes[0]
    points = {c.get_label(): c.get_offsets().tolist() for c in ax.collections}
    # fixture: base is the fastest, the router the best deployable NLL at its speed; the oracle
    # (best NLL, needs the gold domain) is a reference, not a front member
    assert [40.0, pytest.approx(nll["base"])] in points["Pareto front"]
    assert [26.0, pytest.approx(nll["router"])] in points["Pareto front"]
    assert [22.0, pytest.approx(nll["moelora"])] in points["dominated"]
    assert points["oracle (gold domain)"] == [[32.0, pytest.approx(nll["oracle"])]]


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda r: r.pop("metrics"), "no 'metrics' key"),
        (lambda r: r["metrics"][3].pop("value"), r"results\['metrics'\]\[3\] has no 'value'"),
        (lambda r: r["metrics"].__setitem__(0, 1.0), r"\[0\] is a float"),
        (lambda r: r["routing"]["router"]["confusion"].pop(), r"shape \(3, 4\), expected \(4, 4\)"),
        (
            lambda r: r["routing"]["moelora"]["heatmaps"][0].update(weights=[[0.2, 0.3, 0.5]]),
            r"\['heatmaps'\]\[0\]\['weights'\] has shape \(1, 3\), expected \(18, n_experts\)",
        ),
    ],
)
def test_bad_results_are_named(results: dict, tmp_path: Path, mutate, match) -> None:
    bad = copy.deepcopy(results)
    mutate(bad)
    with pytest.raises(ValueError, match=match):
        write_report(bad, tmp_path)
    with pytest.raises(ValueError, match=match):
        write_results(bad, tmp_path)


def _wandb_records(run_file: Path) -> list:
    """Protobuf records of an offline ``run-<id>.wandb`` log (LevelDB log format: 32 KiB blocks,
    each chunk a 7-byte header crc32 / length / type, types 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunks, records = 7, 32768, [], []
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (kind == 0 and length == 0):  # block trailer padding
            pos += left
            continue
        chunks.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            records.append(record)
            chunks = []
    return records


def _wandb_run(run_dir: Path) -> dict:
    """{name, group, tags, job_type, summary: {top-level key: value or nested dict}} of a run."""
    out: dict = {"summary": {}}
    for record in _wandb_records(next(run_dir.glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            out.update(name=run.display_name, group=run.run_group, tags=list(run.tags))
            out["job_type"] = run.job_type
        elif kind == "summary":
            for item in record.summary.update:
                path = [item.key] if item.key else list(item.nested_key)
                node = out["summary"]
                for part in path[:-1]:
                    node = node.setdefault(part, {})
                node[path[-1]] = json.loads(item.value_json)
    return out


def test_wandb_offline_one_run_per_system_plus_comparison(
    results: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb

    from loralab.evaluation.wandb_report import log_results_to_wandb

    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    small = copy.deepcopy(results)  # two systems keep the test to seconds
    keep = ("router", "moelora")
    small["systems"] = list(keep)
    small["metrics"] = [m for m in small["metrics"] if m["system"] in keep]
    plots = write_report(small, tmp_path / "report")
    ids = log_results_to_wandb(small, tmp_path, plots, group="exp1", tags=["test"])
    wandb.teardown()  # offline run logs reach the disk once the W&B service stops
    assert list(ids) == [*keep, "comparison"]
    run_dirs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    runs = {d.name.rsplit("-", 1)[-1]: _wandb_run(d) for d in run_dirs}  # offline-run-<t>-<id>
    assert set(runs) == set(ids.values())
    for name, run_id in ids.items():
        run = runs[run_id]
        assert (run["name"], run["group"], run["tags"]) == (name, "exp1", ["test"])
        assert run["job_type"] == ("comparison" if name == "comparison" else "eval")

    router = runs[ids["router"]]["summary"]
    law_nll = next(
        m
        for m in small["metrics"]
        if m["system"] == "router" and m["set"] == "law" and m["metric"] == "nll"
    )
    assert router["eval/law/nll"] == pytest.approx(law_nll["value"])
    assert router["eval/law/nll_ci_low"] == pytest.approx(law_nll["ci_low"])
    assert router["eval/code/routing_accuracy"] == pytest.approx(0.95)
    eval_keys = {n: {k for k in runs[ids[n]]["summary"] if k.startswith("eval/")} for n in keep}
    routing_keys = {f"eval/{t}/routing_accuracy" for t in ("law", "code", "medical", "general")}
    assert eval_keys["router"] == eval_keys["moelora"] | routing_keys  # comparable side by side
    assert "eval/cost/decode_tokens_per_s" in eval_keys["moelora"]
    assert {"eval/pubmedqa/accuracy", "eval/pubmedqa/accuracy_ci_low"} <= eval_keys["moelora"]

    comparison = runs[ids["comparison"]]["summary"]
    assert comparison["router/accuracy"] == pytest.approx(0.9)
    for key in (
        "metrics",
        "router/confusion",
        "moelora/gate_usage",
        "paired_tests",
        "paired_tests_accuracy",
    ):
        assert comparison[key]["_type"] == "table-file"
    assert comparison["metrics"]["nrows"] == len(small["metrics"])
    assert {f"plots/{s}" for s in PLOT_STEMS} <= set(comparison)
    files = run_dirs[0].parent / f"{next(d.name for d in run_dirs if ids['comparison'] in d.name)}"
    confusion = json.loads((files / "files" / comparison["router/confusion"]["path"]).read_text())
    assert confusion["columns"] == ["true", "law", "code", "medical", "base"]
    assert confusion["data"][2] == ["medical", 2, 0, 17, 1]


def test_notebook_is_stripped() -> None:
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    assert all(c.outputs == [] and c.execution_count is None for c in code)


def test_notebook_runs_headless_on_results(
    results: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nbformat
    from nbclient import NotebookClient

    write_results(results, tmp_path)
    monkeypatch.setenv("LORALAB_RUN_DIR", str(tmp_path))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # NLL bars, gap recovery, Pareto, gate usage
    text = "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in outputs)
    assert str(tmp_path) in text  # it says which run it loaded
    assert "moelora" in text  # the metrics table


def test_notebook_default_run_dir_is_newest_pipeline_run(tmp_path: Path) -> None:
    # the notebook's locating logic, run as plain Python against a fake repo layout
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    source = next(c.source for c in nb.cells if "def find_run_dir" in c.source)
    namespace: dict = {}
    exec(source.split("# --- load")[0], namespace)
    for name, mtime in (("2026-01-01_00-00-00", 1), ("2026-01-02_00-00-00", 2)):
        run = tmp_path / "outputs" / "run_pipeline" / name
        run.mkdir(parents=True)
        (run / "results.json").write_text("{}")
        os.utime(run / "results.json", (mtime, mtime))
    (tmp_path / "outputs" / "run_pipeline" / "2026-01-03_unfinished").mkdir()  # no results.json
    (tmp_path / "pyproject.toml").write_text("")
    committed = tmp_path / "notebooks" / "results" / "quick_cpu"
    committed.mkdir(parents=True)
    (committed / "results.json").write_text("{}")
    found = namespace["find_run_dir"](env={}, start=tmp_path / "notebooks")
    assert found.name == "2026-01-02_00-00-00"  # a run of one's own wins over the committed one
    assert namespace["find_run_dir"](env={"LORALAB_RUN_DIR": "/x"}, start=tmp_path) == Path("/x")
    # relative: from the repository root, wherever the kernel runs (it runs in notebooks/)
    relative = {"LORALAB_RUN_DIR": "outputs/run_pipeline/2026-01-01_00-00-00"}
    found_rel = namespace["find_run_dir"](env=relative, start=tmp_path / "notebooks")
    assert found_rel == tmp_path / "outputs" / "run_pipeline" / "2026-01-01_00-00-00"
    with pytest.raises(FileNotFoundError, match="set LORALAB_RUN_DIR"):
        namespace["find_run_dir"](env={}, start=tmp_path.parent)
    shutil.rmtree(tmp_path / "outputs")
    assert namespace["find_run_dir"](env={}, start=tmp_path) == committed
    (committed / "results.json").unlink()
    with pytest.raises(FileNotFoundError, match="run scripts/run_pipeline"):
        namespace["find_run_dir"](env={}, start=tmp_path)


def test_mean_domain_nll_averages_the_runs_own_domains(results: dict) -> None:
    from loralab.evaluation.plots import mean_domain_nll

    table = {
        (m["system"], m["set"]): m["value"] for m in results["metrics"] if m["metric"] == "nll"
    }
    four = {**results, "domains": ["law", "code"]}  # a run whose experts are law and code only
    assert mean_domain_nll(four)["base"] == pytest.approx(
        (table["base", "law"] + table["base", "code"]) / 2
    )
    legacy = {k: v for k, v in results.items() if k != "domains"}  # results before the key
    legacy["config"] = {**results["config"], "data": {"domains": ["medical"]}}
    assert mean_domain_nll(legacy)["base"] == pytest.approx(table["base", "medical"])


COMMITTED_RUN = NOTEBOOK.parent / "results" / "quick_cpu"
README = NOTEBOOK.parents[1] / "README.md"


def test_readme_results_come_from_the_committed_run():
    """The README's head-to-head tables are rows of the committed run's report, and that report
    is what ``render_report`` makes of the committed ``results.json``."""
    from loralab.evaluation.plots import PLOTS
    from loralab.evaluation.report import render_report

    results = json.loads((COMMITTED_RUN / "results.json").read_text())
    validate_results(results)
    assert results["experiment"] == "quick_cpu"
    from omegaconf import OmegaConf

    from loralab.evaluation.build import expand_systems

    quick_cpu = OmegaConf.load(NOTEBOOK.parents[1] / "conf/experiment/quick_cpu.yaml")
    assert results["systems"] == expand_systems(list(quick_cpu.eval.systems), list(DOMAINS))
    plots = {stem: COMMITTED_RUN / "plots" / f"{stem}.png" for stem in PLOTS}
    drawn = {stem: p for stem, p in plots.items() if PLOTS[stem][1](results) is not None}
    assert all(p.is_file() for p in drawn.values())
    skipped = {stem: PLOTS[stem][2] for stem in PLOTS if stem not in drawn}
    report = (COMMITTED_RUN / "report.md").read_text()
    assert render_report(results, drawn, skipped, COMMITTED_RUN) == report
    readme = README.read_text()
    section = readme.split("<!-- results: quick_cpu -->")[1].split("<!-- /results -->")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) > 40
    assert [r for r in rows if r not in report.splitlines()] == []
