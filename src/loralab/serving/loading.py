"""What the server serves, built once from a pipeline run: one base model wrapped once by
``MoELoraModel`` with every expert resident, the trained gate (``moe``), the router (``auto``), the
engine and the adapter registry.

Run layout (``loralab.pipeline.STAGE_ARTIFACTS``): ``experts/adapters/<name>`` (required),
``router/router`` (optional: without it ``auto`` answers 404), ``moelora/moelora`` (optional:
without it ``moe`` answers 404). Every expert is verified (both files' SHA-256 and the base
fingerprint) before it becomes servable; the gate and the router verify their own files.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from loralab.artifacts import read_manifest, verify_adapter
from loralab.base_model import load_base_model, weights_fingerprint
from loralab.serving.engine import BatchEngine, EngineConfig
from loralab.serving.metrics import ServerMetrics
from loralab.serving.registry import AdapterRegistry

log = logging.getLogger(__name__)

STAGES = {"experts": "experts/adapters", "router": "router/router", "moelora": "moelora/moelora"}
MODES = ("base", "auto", "moe")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
REPO = Path(__file__).resolve().parents[3]


@dataclass(frozen=True)
class ServerSettings:
    """``conf/server/*.yaml``, checked (each bad field named)."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    admin_api_key: str | None = None  # load / unload; None: the api_key
    runtime_lora_updating: bool = True
    adapter_root: str | None = None  # None: <run_dir>/experts/adapters
    max_loaded_adapters: int = 8
    lora_modules: dict[str, str] = field(default_factory=dict)  # loaded (pinned) at start-up
    adapter_wait_s: float = 30.0
    max_model_len: int = 2048
    max_tokens: int = 1024  # the cap a request may ask for
    default_max_tokens: int = 256
    default_temperature: float = 1.0
    default_top_p: float = 1.0
    max_batch_size: int = 32
    max_queue: int = 256
    max_prefill_tokens: int = 2048
    allow_non_loopback: bool = False
    num_threads: int | None = None  # torch intra-op threads (None: torch's default)

    def __post_init__(self) -> None:
        if self.host not in LOOPBACK and not self.allow_non_loopback:
            raise ValueError(
                f"server.host={self.host!r}: the server binds to loopback {LOOPBACK} "
                "(server.allow_non_loopback=true to override, behind an API key)"
            )
        for name in ("max_loaded_adapters", "max_model_len", "max_tokens", "default_max_tokens"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"server.{name} must be >= 1, got {getattr(self, name)}")
        if self.default_max_tokens > self.max_tokens:
            raise ValueError("server.default_max_tokens must be <= server.max_tokens")
        if not 0.0 <= self.default_temperature <= 2.0 or not 0.0 < self.default_top_p <= 1.0:
            raise ValueError(
                "server.default_temperature must be in [0, 2], default_top_p in (0, 1]"
            )
        EngineConfig(
            self.max_batch_size, self.max_queue, self.max_prefill_tokens, self.max_model_len
        )

    @classmethod
    def from_config(cls, cfg: DictConfig | dict[str, Any]) -> ServerSettings:
        raw = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
        assert isinstance(raw, dict)
        data: dict[str, Any] = {str(k): v for k, v in raw.items()}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(map(str, data)) - known)
        if unknown:
            raise ValueError(f"server: unknown field(s) {unknown}; known: {sorted(known)}")
        data["lora_modules"] = dict(data.get("lora_modules") or {})
        return cls(**data)

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            self.max_batch_size, self.max_queue, self.max_prefill_tokens, self.max_model_len
        )


@dataclass
class ServingState:
    """Everything the app serves (one per server)."""

    settings: ServerSettings
    model: Any  # moelora.MoELoraModel
    tokenizer: Any
    engine: BatchEngine
    registry: AdapterRegistry
    metrics: ServerMetrics
    base_name: str
    run_dir: Path
    router: Any = None  # router.Router
    has_gate: bool = False

    @property
    def gate_slots(self) -> list[str]:
        return list(self.model.slot_names)


def run_paths(run_dir: Path) -> dict[str, Path]:
    return {stage: run_dir / sub for stage, sub in STAGES.items()}


def train_smoke_run(run_dir: Path) -> None:
    """The smoke pipeline's experts, router and gate into ``run_dir`` (tiny model: seconds to a minute)."""
    log.info("no smoke run in %s: training it first (experts, router, gate)", run_dir)
    command = [
        sys.executable,
        str(REPO / "scripts" / "run_pipeline.py"),
        "experiment=smoke",
        "pipeline.stages=[experts,router,moelora]",
        f"hydra.run.dir={run_dir}",
    ]
    subprocess.run(command, check=True, cwd=REPO, stdin=subprocess.DEVNULL)


def find_experts(experts_dir: Path) -> dict[str, Path]:
    return {p.parent.name: p.parent for p in sorted(experts_dir.glob("*/manifest.json"))}


def ensure_run(cfg: DictConfig) -> Path:
    """The run dir (absolute); the smoke run is trained first when it is missing and allowed
    (``train_if_missing``; null: for ``experiment=smoke`` only). Raises naming the fix otherwise."""
    run_dir = Path(str(cfg.run_dir)).expanduser().resolve()
    experts_dir = run_paths(run_dir)["experts"]
    train = cfg.get("train_if_missing")
    if train is None:
        train = cfg.get("experiment_name") == "smoke"
    if not find_experts(experts_dir) and train:
        train_smoke_run(run_dir)
    if not find_experts(experts_dir):
        raise FileNotFoundError(
            f"{experts_dir}: no expert adapters (*/manifest.json). Run the main job first: "
            f"`python scripts/run_pipeline.py` (or pass run_dir=<a pipeline run>)"
        )
    return run_dir


def build_model(base: Any, run_dir: Path, fingerprint: str) -> tuple[Any, bool]:
    """The base wrapped once by MoELoraModel with every expert of the run resident: the trained
    gate's experts first (in its order), then the others; (model, whether a trained gate is in)."""
    from moelora import MoELoraConfig, MoELoraModel, load_moelora, read_expert, read_gate_metadata

    paths = run_paths(run_dir)
    experts = find_experts(paths["experts"])
    gate_dir = paths["moelora"]
    has_gate = (gate_dir / "moelora.json").is_file()
    if has_gate:
        names = [e["name"] for e in read_gate_metadata(gate_dir)["experts"]]
        missing = [n for n in names if n not in experts]
        if missing:
            raise FileNotFoundError(
                f"{gate_dir}: the gate mixes {missing}, not in {paths['experts']}"
            )
        model = load_moelora(base, gate_dir, {n: experts[n] for n in names}, fingerprint)
        for name in sorted(set(experts) - set(names)):  # run experts the gate does not mix
            model.add_expert(read_expert(name, experts[name]))
    else:
        log.warning("%s: no trained gate; model=moe is not served", gate_dir)
        model = MoELoraModel.from_adapters(base, experts, MoELoraConfig(), fingerprint)
    return model, has_gate


def build_state(cfg: DictConfig) -> ServingState:
    """Load and verify everything ``cfg`` (conf/serve.yaml) names; raises naming what is missing."""

    settings = ServerSettings.from_config(cfg.server)
    if settings.num_threads:
        import torch

        torch.set_num_threads(settings.num_threads)
    run_dir = ensure_run(cfg)
    paths = run_paths(run_dir)
    experts = find_experts(paths["experts"])
    base, tokenizer = load_base_model(cfg.base_model, cfg.paths.cache_dir)
    fingerprint = weights_fingerprint(base)
    for folder in experts.values():
        verify_adapter(folder, fingerprint)  # weights + config sha256, base fingerprint
    model, has_gate = build_model(base, run_dir, fingerprint)
    model.eval()
    metrics = ServerMetrics()
    engine = BatchEngine(model, tokenizer, settings.engine_config(), metrics.observe_step)
    metrics.watch_engine(engine.stats)
    base_name = str(read_manifest(next(iter(experts.values())))["base_model"]["name"])
    root = Path(settings.adapter_root) if settings.adapter_root else paths["experts"]

    def on_change(resident: int, evicted: bool) -> None:
        metrics.loaded_adapters.set(resident)
        if evicted:
            metrics.evictions.inc()

    registry = AdapterRegistry(
        engine,
        model,
        root,
        fingerprint,
        settings.max_loaded_adapters,
        reserved={*MODES, base_name},
        wait_s=settings.adapter_wait_s,
        on_change=on_change,
    )
    for info in model.experts:  # resident from the start, never evicted
        gate_expert = info.name in model.gate_expert_names
        registry.add_resident(info.name, Path(info.directory), info.adapter_sha256, gate_expert)
    if len(model.experts) > settings.max_loaded_adapters:
        raise ValueError(
            f"server.max_loaded_adapters={settings.max_loaded_adapters} is below the "
            f"{len(model.experts)} experts the model is built with"
        )
    router = None
    if (paths["router"] / "router.json").is_file():
        import router as router_lib

        router = router_lib.load(paths["router"])
        unserved = sorted(set(router.labels) - set(experts) - {router.base_label})
        if unserved:
            log.warning("router labels %s have no adapter in %s", unserved, paths["experts"])
    else:
        log.warning("%s: no router; model=auto is not served", paths["router"])
    return ServingState(
        settings, model, tokenizer, engine, registry, metrics, base_name, run_dir, router, has_gate
    )
