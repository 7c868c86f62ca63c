"""The vLLM launcher without vLLM: command line, config checks, finding and verifying a run's
experts, stopping a whole process group, and a server that dies before it is healthy. Seconds."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from loralab.serving import vllm_cpu
from loralab.serving.vllm_cpu import ServerConfig, VLLMServerError


def _model_dir(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    return model


def _adapter(tmp_path: Path, name: str, r: int) -> Path:
    path = tmp_path / name
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"r": r, "peft_type": "LORA"}))
    return path


def test_command_serves_the_adapters_on_loopback(tmp_path: Path) -> None:
    model = _model_dir(tmp_path)
    law, code = _adapter(tmp_path, "law", 16), _adapter(tmp_path, "code", 8)
    cfg = ServerConfig(model, "HuggingFaceTB/SmolLM2-135M-Instruct", {"law": law, "code": code})
    cmd = cfg.command("/venv/bin/python", 8123)
    assert cmd[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]

    def flags(name: str) -> str:
        return cmd[cmd.index(name) + 1]

    assert flags("--host") == "127.0.0.1" and flags("--port") == "8123"
    assert flags("--model") == str(model)
    assert flags("--served-model-name") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (flags("--max-lora-rank"), flags("--max-loras")) == ("16", "3")
    i = cmd.index("--lora-modules")
    assert cmd[i + 1 : i + 3] == [f"law={law}", f"code={code}"]
    assert "--enable-lora" in cmd
    assert cfg.environment() == {
        "VLLM_CPU_KVCACHE_SPACE": "2",
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
    }


def test_config_refuses_what_vllm_would_reject_a_minute_later(tmp_path: Path) -> None:
    model = _model_dir(tmp_path)
    big = _adapter(tmp_path, "big", 64)
    with pytest.raises(ValueError, match="loopback"):
        ServerConfig(model, "m", host="0.0.0.0")
    with pytest.raises(ValueError, match="vLLM allows"):
        ServerConfig(model, "m", max_lora_rank=4)
    with pytest.raises(ValueError, match="rank 64 > max_lora_rank"):
        ServerConfig(model, "m", {"big": big}, max_lora_rank=32)
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        ServerConfig(tmp_path / "nowhere", "m")
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json"):
        ServerConfig(model, "m", {"law": tmp_path / "missing"})


def test_find_experts_in_each_run_layout(tmp_path: Path) -> None:
    for layout in ("pipeline/experts/adapters", "experts_run/adapters", "bare"):
        for domain in ("law", "code"):
            d = tmp_path / layout / domain
            d.mkdir(parents=True)
            (d / "manifest.json").write_text("{}")
    assert set(vllm_cpu.find_experts(tmp_path / "pipeline")) == {"law", "code"}
    assert vllm_cpu.find_experts(tmp_path / "experts_run")["law"] == (
        tmp_path / "experts_run" / "adapters" / "law"
    )
    assert set(vllm_cpu.find_experts(tmp_path / "bare")) == {"law", "code"}
    with pytest.raises(FileNotFoundError, match="no expert adapters"):
        vllm_cpu.find_experts(tmp_path / "pipeline" / "experts" / "adapters" / "law")


def test_env_is_reused_only_when_complete(tmp_path: Path) -> None:
    env = tmp_path / "vllm-cpu-venv"
    (env / "bin").mkdir(parents=True)
    (env / "bin" / "python").write_text("")
    assert not vllm_cpu.env_ready(env)  # a build that stopped before its marker
    (env / vllm_cpu.MARKER).write_text(json.dumps({"vllm_cpu": "0.0.1"}))
    assert not vllm_cpu.env_ready(env)  # another vllm-cpu version
    (env / vllm_cpu.MARKER).write_text(json.dumps({"vllm_cpu": vllm_cpu.VLLM_CPU_VERSION}))
    assert vllm_cpu.ensure_env(env) == env / "bin" / "python"  # returns at once, builds nothing
    assert not (tmp_path / "vllm-cpu-venv.build.log").exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


def test_stop_ends_the_whole_process_group(tmp_path: Path) -> None:
    # a leader with a child that ignores SIGTERM, like a wedged engine core
    script = "trap '' TERM; sleep 300 & echo $! > child.pid; wait"
    proc = subprocess.Popen(["bash", "-c", script], cwd=tmp_path, start_new_session=True)
    for _ in range(100):
        if (tmp_path / "child.pid").is_file() and (tmp_path / "child.pid").read_text().strip():
            break
        time.sleep(0.05)
    child = int((tmp_path / "child.pid").read_text())
    start = time.monotonic()
    vllm_cpu.stop_process_group(proc.pid, proc, grace_s=1.0)
    assert time.monotonic() - start < 10
    assert proc.poll() is not None
    assert not _alive(child)
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)


def test_a_server_that_dies_early_reports_its_log(tmp_path: Path) -> None:
    cfg = ServerConfig(_model_dir(tmp_path), "m")
    broken = tmp_path / "python"  # an environment whose interpreter fails at once
    broken.write_text('#!/bin/sh\necho "ImportError: libvllm.so: cannot open" >&2\nexit 3\n')
    broken.chmod(0o755)
    with pytest.raises(VLLMServerError, match="exited with code 3") as err:
        vllm_cpu.start_server(cfg, broken, tmp_path / "server.log", timeout_s=60)
    assert "libvllm.so: cannot open" in str(err.value)  # the log's tail is in the error
    assert str(tmp_path / "server.log") in str(err.value)


def test_config_for_run_checks_the_base_fingerprint(smoke_experts: dict, tmp_path: Path) -> None:
    from loralab.artifacts import AdapterVerificationError
    from loralab.base_model import load_base_model

    model, tokenizer = load_base_model(smoke_experts["cfg"].base_model)
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    cfg = vllm_cpu.config_for_run(smoke_experts["dir"], tmp_path / "base")
    assert set(cfg.adapters) == set(smoke_experts["adapters"])
    assert cfg.served_model_name == "loralab/tiny-llama"
    assert (cfg.max_lora_rank, cfg.max_loras) == (8, 3)  # smoke rank 4 -> vLLM's next allowed

    import torch

    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(1.5)  # another base model
    model.save_pretrained(tmp_path / "other")
    tokenizer.save_pretrained(tmp_path / "other")
    with pytest.raises(AdapterVerificationError, match="fingerprint"):
        vllm_cpu.config_for_run(smoke_experts["dir"], tmp_path / "other")
