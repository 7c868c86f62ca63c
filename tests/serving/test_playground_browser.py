"""The playground page in a real headless Chromium (Debian's `chromium`, driven by Playwright)
against the server on loopback: compare streams, router bars, coloured tokens, token details,
stop, load / unload, errors in words, a phone width. Screenshots go to each test's tmp dir."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from loralab.serving.playground_browser import chromium_context
from tests.router.tests_router_helpers import QUESTIONS
from tests.serving.serving_helpers import engine_held, wait_for

pytestmark = pytest.mark.browser

KEY, ADMIN = "sk-page", "sk-admin"
ASK = QUESTIONS["law"]


@pytest.fixture(scope="module")
def site(start_server) -> Any:
    """One server for the module: keys on, room for three requests waiting."""
    return start_server(
        [f"server.api_key={KEY}", f"server.admin_api_key={ADMIN}", "server.max_queue=3"]
    )


@pytest.fixture(scope="module")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with chromium_context(tmp_path_factory.mktemp("chromium-profile")) as context:
        yield context


@pytest.fixture
def page(chromium: Any, site: Any, tmp_path: Path) -> Iterator[Any]:
    """A fresh tab on the page with the API key entered; a screenshot of it when the test ends."""
    tab = chromium.new_page()
    tab.set_viewport_size({"width": 1280, "height": 900})
    outside: list[str] = []
    crashes: list[str] = []
    tab.on("request", lambda r: None if r.url.startswith(site.url) else outside.append(r.url))
    tab.on("pageerror", lambda error: crashes.append(str(error)))
    open_page(tab, site.url)
    yield tab
    tab.screenshot(path=str(tmp_path / "playground.png"), full_page=True)
    tab.close()
    assert outside == [], "the page reached outside its server"
    assert crashes == [], "uncaught errors in the page's scripts"


def open_page(tab: Any, url: str, key: str = KEY) -> None:
    tab.goto(url)
    tab.wait_for_selector("body[data-ready=true]")
    if key:
        tab.fill("#api-key", key)
        tab.locator("#api-key").blur()  # a change: the page lists the models again
        tab.wait_for_selector("#models tr[data-model=moe]")


def ask_page(
    tab: Any, model: str, prompt: str = ASK, max_tokens: int = 12, extra: str = ""
) -> None:
    tab.select_option("#mode", model)
    if model == "compare":
        tab.select_option("#extra", extra)
    tab.fill("#max-tokens", str(max_tokens))
    tab.fill("#temperature", "0")
    tab.fill("#prompt", prompt)
    tab.press("#prompt", "Enter")  # the keyboard submits


def finished(tab: Any) -> None:
    tab.wait_for_selector("#answers[data-state=idle]", timeout=60_000)


def panel(tab: Any, model: str) -> Any:
    return tab.locator(f".panel[data-model='{model}']")


def streamed(site: Any, model: str, max_tokens: int = 12) -> dict[str, Any]:
    """The same request through the API: text, route, slots and (text, gate) per visible token."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": ASK}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "return_gate_weights": True,
    }
    headers = {"Authorization": f"Bearer {KEY}"}
    out: dict[str, Any] = {"text": "", "tokens": []}
    with httpx.stream(
        "POST", f"{site.url}/v1/chat/completions", json=body, headers=headers, timeout=60
    ) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = httpx.Response(200, content=line[6:]).json()
            out.setdefault("route", chunk.get("route"))
            out.setdefault("slots", chunk.get("gate_slots"))
            choice = chunk["choices"][0]
            text = choice["delta"].get("content") or ""
            out["text"] += text
            if "gate_weights" in choice and text:
                out["tokens"].append((text, choice["gate_weights"]))
    return out


def slow_steps(site: Any, monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Each forward of the served model waits ``seconds`` first (a bigger model's pace)."""
    model = site.state.model.base_model
    forward = model.forward

    def slow(*args: Any, **kwargs: Any) -> Any:
        threading.Event().wait(seconds)
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", slow)


def dominant(slots: list[str], mean: list[float]) -> str:
    top = max(range(len(mean)), key=lambda i: mean[i])
    return slots[top] if mean[top] > 0 else "none"


def test_the_page_asks_for_the_key_and_lists_the_models(chromium, site, tmp_path):
    tab = chromium.new_page()
    open_page(tab, site.url, key="")
    assert "needs an API key" in tab.inner_text("#error")
    tab.fill("#api-key", KEY)
    tab.locator("#api-key").blur()  # a change: the page lists the models again
    tab.wait_for_selector("#models tr[data-model=moe]")
    rows = tab.locator("#models tr").evaluate_all("rows => rows.map(r => r.dataset.model)")
    assert rows == ["base", "auto", "moe", "law", "code", "medical"]
    modes = tab.locator("#mode option").evaluate_all("o => o.map(x => x.value)")
    assert modes == ["compare", "auto", "moe", "base", "law", "code", "medical"]
    tab.screenshot(path=str(tmp_path / "models.png"), full_page=True)
    tab.close()


def test_compare_streams_auto_moe_and_an_adapter_side_by_side(page, site, monkeypatch):
    slow_steps(site, monkeypatch, 0.02)  # the tiny model is faster than one network read
    # Record every state of each answer while it streams in.
    page.evaluate(
        """() => { window.seen = {}; new MutationObserver(() => {
             for (const p of document.querySelectorAll('.panel')) {
               const n = p.querySelectorAll('.tok').length;
               (window.seen[p.dataset.model] ??= new Set()).add(n);
             } }).observe(document.getElementById('answers'), {subtree: true, childList: true}); }"""
    )
    ask_page(page, "compare", extra="law")
    finished(page)
    models = page.locator(".panel").evaluate_all("ps => ps.map(p => p.dataset.model)")
    assert models == ["auto", "moe", "law"]
    boxes = [panel(page, m).bounding_box() for m in models]
    assert boxes[0]["y"] == boxes[1]["y"] == boxes[2]["y"]  # side by side on a laptop
    seen = page.evaluate(
        "() => Object.fromEntries(Object.entries(seen).map(([k, v]) => [k, v.size]))"
    )
    for model in models:
        want = streamed(site, model)
        assert panel(page, model).locator(".answer").inner_text() == want["text"]
        assert panel(page, model).get_attribute("data-state") == "done"
        assert seen[model] > 2  # the answer grew token by token
        spans = panel(page, model).locator(".tok")
        got = spans.evaluate_all("s => s.map(x => [x.textContent, x.dataset.slot])")
        assert got == [[t, dominant(want["slots"], g["mean"])] for t, g in want["tokens"]]
    law = panel(page, "law").locator(".tok").evaluate_all("s => s.map(x => x.dataset.slot)")
    assert set(law) == {"law"}
    moe = panel(page, "moe").locator(".tok").evaluate_all("s => s.map(x => x.dataset.slot)")
    assert len(set(moe)) > 1  # the gate mixes: tokens of more than one dominant expert

    route = streamed(site, "auto")["route"]
    bars = panel(page, "auto").locator(".route-probs .bar-row")
    shown = bars.evaluate_all(
        "rs => rs.map(r => [r.dataset.label, r.querySelector('.bar-value').textContent])"
    )
    want_bars = sorted(route["probs"].items(), key=lambda kv: -kv[1])
    assert shown == [[label, f"{p:.2f}"] for label, p in want_bars]
    assert panel(page, "auto").locator(".route-label").inner_text() == route["label"] == "law"
    assert panel(page, "auto").locator(".route-reason").inner_text() == "confident"
    assert "decided in" in panel(page, "auto").locator(".route").inner_text()
    legend = page.locator(".legend-item").evaluate_all("i => i.map(x => x.dataset.slot)")
    slots = streamed(site, "moe")["slots"]
    assert legend == (slots if "none" in slots else [*slots, "none"])
    stats = panel(page, "moe").locator(".stats").inner_text()
    assert re.search(r"\d+ tokens · first token \d+ ms", stats), stats


def test_a_token_shows_its_weights_and_layers_on_hover_and_tap(page, site):
    ask_page(page, "moe")
    finished(page)
    want = streamed(site, "moe")
    pick = next(i for i, (t, _) in enumerate(want["tokens"]) if i > 0 and t.strip())
    panel(page, "moe").locator(".tok").nth(pick).hover()
    detail = page.locator("#token-detail")
    assert detail.is_visible()
    text, gate = want["tokens"][pick]
    assert page.inner_text("#token-text") == json.dumps(text, ensure_ascii=False)
    assert page.inner_text("#token-where") == f"moe, token {pick + 1}"
    weights = detail.locator(".bar-row").evaluate_all(
        "rs => rs.map(r => [r.dataset.label, r.querySelector('.bar-value').textContent])"
    )
    assert weights == [[s, f"{w:.2f}"] for s, w in zip(want["slots"], gate["mean"], strict=True)]
    columns = detail.locator("#token-layers .layer")
    assert columns.count() == len(gate["layers"]) >= 1
    heights = (
        columns.nth(0).locator(".layer-part").evaluate_all("ps => ps.map(p => p.style.height)")
    )
    assert heights == [f"{100 * w:.1f}%" for w in gate["layers"][0]]
    first = next(i for i, (t, _) in enumerate(want["tokens"]) if i != pick and t.strip())
    panel(page, "moe").locator(".tok").nth(first).click()  # a tap selects too
    assert "selected" in (panel(page, "moe").locator(".tok").nth(first).get_attribute("class"))
    assert page.inner_text("#token-where") == f"moe, token {first + 1}"


def test_stop_ends_a_running_answer_and_frees_its_row(page, site, monkeypatch):
    engine = site.state.engine
    slow_steps(site, monkeypatch, 0.05)  # time to press Stop
    ask_page(page, "moe", max_tokens=120)
    page.wait_for_selector(".panel[data-model=moe] .tok", state="attached")
    page.click("#stop")
    finished(page)
    assert panel(page, "moe").get_attribute("data-state") == "stopped"
    assert panel(page, "moe").locator(".tok").count() < 120
    wait_for(lambda: engine.stats()["running"] == 0)
    assert page.is_enabled("#send") and not page.is_enabled("#stop")


def test_load_and_unload_an_adapter_with_the_admin_key(page, site):
    page.fill("#load-name", "law_copy")
    page.fill("#load-path", "law")
    page.fill("#admin-key", "wrong")
    page.click("#load button[type=submit]")
    page.wait_for_selector("#load-result:has-text('API key')")
    page.fill("#admin-key", ADMIN)
    page.click("#load button[type=submit]")
    page.wait_for_selector("#models tr[data-model=law_copy]")
    assert page.inner_text("#load-result") == "loaded law_copy"
    assert page.locator("#mode option[value=law_copy]").count() == 1
    assert page.locator("#models tr[data-model=law] button").count() == 0  # pinned: no unload
    page.click("#models tr[data-model=law_copy] button")
    page.wait_for_selector("#models tr[data-model=law_copy]", state="detached")
    assert page.locator("#mode option[value=law_copy]").count() == 0


def test_server_errors_are_shown_in_words(page, site):
    # An adapter unloaded after the page listed it: the request names an unknown model.
    admin = {"Authorization": f"Bearer {ADMIN}"}
    load = {"lora_name": "gone", "lora_path": "law"}
    assert (
        httpx.post(f"{site.url}/v1/load_lora_adapter", json=load, headers=admin).status_code == 200
    )
    page.reload()
    open_page(page, site.url)
    unload = {"lora_name": "gone"}
    assert httpx.post(f"{site.url}/v1/unload_lora_adapter", json=unload, headers=admin).is_success
    ask_page(page, "gone")
    finished(page)
    error = panel(page, "gone").locator(".error").inner_text()
    assert error.startswith("Unknown model or adapter: the model 'gone' does not exist")

    # A full queue: three requests wait while the engine is held; the page's is refused.
    engine = site.state.engine
    body = {"model": "law", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    headers = {"Authorization": f"Bearer {KEY}"}
    url = f"{site.url}/v1/chat/completions"
    waiting = [
        threading.Thread(target=httpx.post, args=(url,), kwargs={"json": body, "headers": headers})
        for _ in range(3)
    ]
    with engine_held(engine):
        for thread in waiting:
            thread.start()
        wait_for(lambda: engine.stats()["waiting"] == 3)
        ask_page(page, "code")
        finished(page)
    for thread in waiting:
        thread.join(60)
    error = panel(page, "code").locator(".error").inner_text()
    assert error == "The server is busy: its request queue is full. Try again in 1 s."


def test_a_stopped_server_is_shown_in_words(chromium, start_server, tmp_path):
    gone = start_server()
    tab = chromium.new_page()
    open_page(tab, gone.url, key="")
    tab.wait_for_selector("#models tr[data-model=moe]")
    assert not tab.is_visible("#admin-key")  # this server needs no key to load adapters
    gone.stop()
    ask_page(tab, "moe")
    finished(tab)
    error = tab.locator(".panel[data-model=moe] .error").inner_text()
    assert error.startswith("The server is not reachable")
    tab.wait_for_selector("#server-status[data-status=unreachable]", timeout=10_000)
    tab.screenshot(path=str(tmp_path / "server-down.png"), full_page=True)
    tab.close()


def test_phone_width_stacks_the_answers(page, site):
    page.set_viewport_size({"width": 390, "height": 844})
    ask_page(page, "compare")
    finished(page)
    auto, moe = (panel(page, m).bounding_box() for m in ("auto", "moe"))
    assert moe["y"] >= auto["y"] + auto["height"]  # one column
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scrolling
    panel(page, "moe").locator(".tok").first.click()
    assert page.locator("#token-detail").is_visible()
