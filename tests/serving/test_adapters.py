"""Hot load / unload / LRU eviction, path containment, verification at load, auth."""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.serving.serving_helpers import wait_for
from tests.serving.test_batching import ids

EXTRA = ("x1", "x2", "x3")


@pytest.fixture(scope="module")
def extra_root(served_run, tmp_path_factory) -> Path:
    """An adapter root with three more random experts (other seeds) on the same base."""
    from loralab.base_model import load_base_model
    from loralab.training.random_experts import make_random_experts

    cfg = served_run["cfg"]
    base, _ = load_base_model(cfg.base_model, cfg.paths.cache_dir, device="cpu")
    root = tmp_path_factory.mktemp("adapter_root")
    make_random_experts(
        base, EXTRA, root, served_run["fingerprint"], str(cfg.base_model.name), r=8, seed=10
    )
    return root


@pytest.fixture(scope="module")
def admin_server(start_server, extra_root):
    """Room for one hot adapter beside the three gate experts; loading needs the admin key."""
    return start_server(
        [
            f"server.adapter_root={extra_root}",
            "server.max_loaded_adapters=4",
            "server.adapter_wait_s=0.5",
            "server.api_key=user-key",
            "server.admin_api_key=admin-key",
        ]
    )


def post(server, path, body, key="admin-key"):
    return httpx.post(
        f"{server.url}{path}", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60
    )


def load(server, name, path):
    return post(server, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})


def unload(server, name):
    return post(server, "/v1/unload_lora_adapter", {"lora_name": name})


def chat(server, model, **extra):
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "the contract"}],
        "max_tokens": 8,
        "temperature": 0,
        "return_token_ids": True,
        **extra,
    }
    return post(server, "/v1/chat/completions", body, key="user-key")


def cards(server):
    r = httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer user-key"})
    return {c["id"]: c for c in r.json()["data"]}


def metric(server, name):
    text = httpx.get(f"{server.url}/metrics", headers={"Authorization": "Bearer user-key"}).text
    return float(
        next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " "))
    )


def test_hot_load_evict_reload_and_unload(admin_server, extra_root, served_run):
    from peft import PeftModel

    from loralab.base_model import load_base_model

    assert load(admin_server, "x1", "x1").json()["status"] == "loaded"
    card = cards(admin_server)["x1"]
    assert card["parent"] == admin_server.state.base_name and card["root"] == "x1"
    x1 = chat(admin_server, "x1").json()
    # the hot-loaded expert answers what PEFT answers with it
    base, _ = load_base_model(served_run["cfg"].base_model, None, device="cpu")
    peft = PeftModel.from_pretrained(base, str(extra_root / "x1")).eval()
    import torch

    prompt = torch.tensor([x1["prompt_token_ids"]])
    out = peft.generate(
        input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False
    )
    assert x1["choices"][0]["token_ids"] == out[0, prompt.shape[1] :].tolist()
    assert x1["choices"][0]["token_ids"] != ids(chat(admin_server, "law"))

    assert load(admin_server, "x2", "x2").status_code == 200  # 4 slots: x1 (LRU) is evicted
    assert cards(admin_server)["x1"]["loralab"]["resident"] is False
    assert metric(admin_server, "loralab_adapter_evictions_total") == 1
    assert metric(admin_server, "loralab_loaded_adapters") == 4
    again = chat(admin_server, "x1").json()  # reloaded (verified again), x2 evicted in turn
    assert again["choices"][0]["token_ids"] == x1["choices"][0]["token_ids"]
    assert cards(admin_server)["x2"]["loralab"]["resident"] is False
    assert metric(admin_server, "loralab_adapter_evictions_total") == 2

    assert unload(admin_server, "x2").json()["status"] == "unloaded"
    assert "x2" not in cards(admin_server)
    gone = chat(admin_server, "x2")
    assert gone.status_code == 404 and gone.json()["error"]["param"] == "model"
    assert unload(admin_server, "x2").status_code == 404
    assert unload(admin_server, "x1").status_code == 200


def test_unload_waits_for_requests_in_flight_and_in_flight_adapters_are_never_evicted(
    admin_server, monkeypatch
):
    engine = admin_server.state.engine
    original = engine.on_step
    monkeypatch.setattr(engine, "on_step", lambda kind, n: (time.sleep(0.03), original(kind, n)))
    assert load(admin_server, "x3", "x3").status_code == 200
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(chat, admin_server, "x3", max_tokens=40, ignore_eos=True)
        wait_for(lambda: engine.stats()["running"] == 1)
        # the only free slot holds x3, which is in use: no room within adapter_wait_s
        busy = load(admin_server, "x1", "x1")
        assert busy.status_code == 503 and "no adapter slot" in busy.json()["error"]["message"]
        unloading = pool.submit(unload, admin_server, "x3")
        time.sleep(0.2)
        assert not unloading.done()  # waits for the request in flight
        assert len(ids(running.result())) == 40  # the request finished whole
        assert unloading.result().status_code == 200
    assert "x3" not in cards(admin_server)


@pytest.mark.parametrize(
    ("path", "status", "words"),
    [
        ("../x1", 400, "without '..'"),
        ("/etc", 400, "relative to the adapter root"),
        ("x1/../../x", 400, "without '..'"),
        ("nothing-here", 404, "no such adapter folder"),
        ("escape", 400, "leaves the adapter root"),
    ],
)
def test_lora_path_stays_inside_the_adapter_root(
    admin_server, extra_root, tmp_path, path, status, words
):
    outside = tmp_path / "outside"
    shutil.copytree(extra_root / "x1", outside)
    link = extra_root / "escape"
    if not link.exists():
        link.symlink_to(outside, target_is_directory=True)
    r = load(admin_server, "y", path)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"] and r.json()["error"]["param"] == "lora_path"
    assert "y" not in cards(admin_server)


def _corrupt(folder: Path, how: str) -> None:
    if how == "weights":
        data = bytearray((folder / "adapter_model.safetensors").read_bytes())
        data[-1] ^= 0xFF
        (folder / "adapter_model.safetensors").write_bytes(bytes(data))
    elif how == "config":
        config = json.loads((folder / "adapter_config.json").read_text())
        config["lora_alpha"] = 999
        (folder / "adapter_config.json").write_text(json.dumps(config))
    else:
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["base_model"]["fingerprint"] = "0" * 64
        (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("how", "words"), [("weights", "sha256"), ("config", "sha256"), ("base", "fingerprint")]
)
def test_tampered_or_mismatched_adapters_are_refused_and_the_server_keeps_serving(
    admin_server, extra_root, how, words
):
    folder = extra_root / f"bad-{how}"
    shutil.copytree(extra_root / "x1", folder)
    _corrupt(folder, how)
    r = load(admin_server, f"bad-{how}", folder.name)
    assert r.status_code == 400 and words in r.json()["error"]["message"]
    assert f"bad-{how}" not in cards(admin_server)
    assert chat(admin_server, "law").status_code == 200


def test_reserved_duplicate_and_gate_expert_names(admin_server):
    for name in ("auto", "moe", "base", admin_server.state.base_name):
        assert load(admin_server, name, "x1").status_code == 400
    assert load(admin_server, "law", "x1").json()["error"]["message"].endswith("is already loaded")
    assert load(admin_server, "bad/name", "x1").status_code == 400
    r = unload(admin_server, "law")
    assert r.status_code == 400 and "gate's experts" in r.json()["error"]["message"]


def test_api_key_and_admin_key(admin_server):
    from openai import AuthenticationError, OpenAI

    url = admin_server.url
    assert httpx.get(f"{url}/health").status_code == 200  # exempt
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "user-key"}):
        r = httpx.get(f"{url}/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "AuthenticationError"
        assert httpx.get(f"{url}/metrics", headers=headers).status_code == 401
    assert (
        post(
            admin_server,
            "/v1/load_lora_adapter",
            {"lora_name": "z", "lora_path": "x1"},
            key="user-key",
        ).status_code
        == 401
    )
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    ok = OpenAI(base_url=f"{url}/v1", api_key="user-key", max_retries=0)
    assert ok.chat.completions.create(
        model="moe", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    ).choices


def test_runtime_loading_can_be_switched_off(start_server):
    server = start_server(["server.runtime_lora_updating=false"])
    r = httpx.post(
        f"{server.url}/v1/load_lora_adapter", json={"lora_name": "z", "lora_path": "law"}
    )
    assert r.status_code == 403 and "runtime_lora_updating" in r.json()["error"]["message"]
