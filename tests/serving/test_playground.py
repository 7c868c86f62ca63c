"""The playground page over plain HTTP: served at / without a key, held to this server by its
Content-Security-Policy, every file it loads served, and the /v1/models extension it reads."""

from __future__ import annotations

import re

import httpx

from loralab.serving.playground import STATIC_DIR


def test_the_page_and_its_files_are_served_without_a_key(start_server):
    keyed = start_server(["server.api_key=sk-x", "server.runtime_lora_updating=false"])
    page = httpx.get(f"{keyed.url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert "connect-src 'self'" in csp
    linked = re.findall(r'(?:src|href)="(/[^"]*)"', page.text)  # data: (the empty icon) aside
    assert linked == ["/static/playground.css", "/static/playground.js"]
    imports = re.findall(r'from "\./([\w.]+)"', (STATIC_DIR / "playground.js").read_text())
    assert sorted(imports) == ["api.js", "view.js"]
    for name in [*linked, *(f"/static/{n}" for n in imports)]:
        r = httpx.get(f"{keyed.url}{name}")
        assert r.status_code == 200, name
        kind = "text/css" if name.endswith(".css") else "javascript"
        assert kind in r.headers["content-type"], name
    assert httpx.get(f"{keyed.url}/v1/models").status_code == 401  # the data still needs it
    info = httpx.get(f"{keyed.url}/v1/models", headers={"Authorization": "Bearer sk-x"}).json()
    assert info["loralab"] == {
        "gate_slots": keyed.state.gate_slots,
        "runtime_lora_updating": False,
        "load_needs_key": True,
    }


def test_nothing_outside_the_static_folder_is_served(server):
    for path in ("/static/%2e%2e/app.py", "/static/..%2fapp.py", "/static/missing.js"):
        r = httpx.get(f"{server.url}{path}")
        assert r.status_code == 404, path
        assert "def create_app" not in r.text


def test_no_file_of_the_page_names_another_host():
    for path in STATIC_DIR.iterdir():
        assert not re.search(r"(?:https?:)?//[\w.-]+\.\w", path.read_text()), path.name


def test_models_tell_the_page_what_it_may_do(client, server):
    info = client.models.list().model_extra["loralab"]
    assert info == {
        "gate_slots": ["law", "code", "medical"],  # the fixture's gate has no "none" slot
        "runtime_lora_updating": True,
        "load_needs_key": False,
    }
    stream = client.chat.completions.create(
        model="moe",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=1,
        stream=True,
        extra_body={"return_gate_weights": True},
    )
    assert next(iter(stream)).model_extra["gate_slots"] == info["gate_slots"]
